package agentclient_test

import (
	"context"
	"io"
	"strconv"
	"testing"

	"github.com/mvm-sh/mvm/internal/agentclient"
)

// BenchmarkExecStdout moves 256 MiB of a real command's stdout through an
// in-process agent over a socketpair: the protocol's cost without a VM.
func BenchmarkExecStdout(b *testing.B) {
	c := startAgent(&testing.T{})
	const size = 256 << 20
	b.SetBytes(size)
	for i := 0; i < b.N; i++ {
		p, err := c.Exec(context.Background(), agentclient.ExecSpec{
			Argv:   []string{"dd", "if=/dev/zero", "bs=65536", "count=" + strconv.Itoa(size/65536), "status=none"},
			Stdout: io.Discard,
		})
		if err != nil {
			b.Fatal(err)
		}
		if st, err := p.Wait(context.Background()); err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
	}
}
