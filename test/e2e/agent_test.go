package e2e

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
)

// TestAgentSessionSoak drives one VM's agent directly: many round trips
// and concurrent commands with output on both streams, checking that no
// call is lost or stalls and no byte is lost. A lost frame shows up here
// as a timeout.
func TestAgentSessionSoak(t *testing.T) {
	m := startMachine(t, machineConfig(t, "soak"))
	conn, err := m.DialAgent(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c, err := agentclient.Dial(conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := c.Hello(ctx); err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				var out, errb bytes.Buffer
				want := fmt.Sprintf("worker %d round %d", w, i)
				p, err := c.Exec(ctx, agentclient.ExecSpec{
					Argv:   []string{"sh", "-c", `i=0; while [ $i -lt 200 ]; do echo "$1 $i"; echo "err $i" >&2; i=$((i+1)); done`, "sh", want},
					Stdout: &out, Stderr: &errb,
				})
				if err != nil {
					errs <- err
					return
				}
				st, err := p.Wait(ctx)
				if err != nil || st.Code != 0 {
					errs <- fmt.Errorf("%s: %+v %v", want, st, err)
					return
				}
				lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
				if len(lines) != 200 || lines[199] != want+" 199" || strings.Count(errb.String(), "\n") != 200 {
					errs <- fmt.Errorf("%s: %d stdout lines, %d stderr lines", want, len(lines), strings.Count(errb.String(), "\n"))
					return
				}
			}
		}()
	}
	for i := 0; i < 1000; i++ {
		pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
		if _, err := c.Ping(pctx); err != nil {
			pcancel()
			t.Fatalf("ping %d: %v", i, err)
		}
		pcancel()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
