package e2e

import (
	"bytes"
	"os/exec"
)

type execCmd struct {
	*exec.Cmd
	stderr *bytes.Buffer
}
