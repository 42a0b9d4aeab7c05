// Package mvm runs commands in throwaway microVMs.
//
// A Sandbox is one VM: Start boots it (from the default image that
// `mvmctl bootstrap` builds), Exec and Start run commands in it through the
// guest agent with their output streamed as it is written, and Close tears
// it down, writing back what the guest changed in directories shared
// read-write. Run does all three for one command, with the interrupt
// handling a command-line tool wants; `mvmctl exec` is a thin client of it.
//
//	sb, err := mvm.Start(ctx, mvm.Config{CPUs: 2, Memory: 512 << 20})
//	if err != nil { ... }
//	defer sb.Close(context.Background())
//	st, err := sb.Exec(ctx, mvm.Cmd{Argv: []string{"uname", "-a"}, Stdout: os.Stdout})
//
// The guest is treated as hostile: nothing it writes (output, protocol
// frames, disk images, file names) can make the host allocate without
// bound, write outside the shared directories or block forever; see
// docs/security.md.
//
// Errors are typed: test them with errors.Is and errors.As, never by their
// text. ErrNotBootstrapped: there is no image to boot. ErrInvalid (in a
// *RequestError): the configuration or command is wrong, found before
// anything booted. ErrTimeout: a command ran into Cmd.Timeout.
// ErrCommandNotFound and ErrNotExecutable (in a *StartError): the command
// could not be started. *VMError: the VM or its agent failed, with the
// kept console log. *WriteBackError: a read-write directory could not be
// written back; its changes are kept at a path it names.
package mvm
