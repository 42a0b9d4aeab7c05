package agentclient_test

import "os"

func newFile(fd int) *os.File { return os.NewFile(uintptr(fd), "socketpair") }
