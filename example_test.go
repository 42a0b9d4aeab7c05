package mvm_test

// These examples boot real microVMs: they need the default image
// (`mvmctl bootstrap`) and, when run as root, mvm-jailer (`make build`;
// the Makefile points MVM_JAILER at it).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/mvm-sh/mvm"
)

// Start a sandbox, run commands in it, close it.
func Example() {
	ctx := context.Background()
	sb, err := mvm.Start(ctx, mvm.Config{CPUs: 1, Memory: 256 << 20})
	if err != nil {
		log.Fatal(err)
	}
	defer sb.Close(ctx)

	st, err := sb.Exec(ctx, mvm.Cmd{
		Argv:   []string{"sh", "-c", `echo "hello from $(uname -s)"; exit 3`},
		Stdout: os.Stdout,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(st)
	// Output:
	// hello from Linux
	// exit status 3
}

// Run is the one-shot form: boot, run one command, tear down.
func ExampleRun() {
	var out bytes.Buffer
	res, err := mvm.Run(context.Background(), mvm.Config{}, mvm.Cmd{
		Argv:   []string{"sh", "-c", "cat | tr a-z A-Z"},
		Stdin:  strings.NewReader("shouting from a microVM\n"),
		Stdout: &out,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(out.String())
	fmt.Println(res.ExitStatus)
	// Output:
	// SHOUTING FROM A MICROVM
	// exit status 0
}

// Commands can run concurrently in one sandbox, each with its own output.
func ExampleSandbox_Start() {
	ctx := context.Background()
	sb, err := mvm.Start(ctx, mvm.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer sb.Close(ctx)

	outs := make([]bytes.Buffer, 3)
	procs := make([]*mvm.Process, 3)
	for i := range procs {
		if procs[i], err = sb.Start(ctx, mvm.Cmd{
			Argv:   []string{"sh", "-c", fmt.Sprintf("sleep 0.$((3 - %d)); echo worker %d", i, i)},
			Stdout: &outs[i],
		}); err != nil {
			log.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); _, _ = p.Wait() }()
	}
	wg.Wait()
	for i := range outs {
		fmt.Print(outs[i].String())
	}
	// Output:
	// worker 0
	// worker 1
	// worker 2
}

// A read-write directory: what the guest writes there is written back to
// the host when the sandbox closes.
func ExampleDir() {
	dir, err := os.MkdirTemp("", "mvm-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	_, err = mvm.Run(context.Background(),
		mvm.Config{Dirs: []mvm.Dir{{Host: dir, Guest: "/out", Writable: true}}},
		mvm.Cmd{Argv: []string{"sh", "-c", "echo made in a VM > /out/result.txt"}})
	if err != nil {
		log.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "result.txt"))
	fmt.Print(string(b))
	// Output:
	// made in a VM
}

// Errors are typed: test them with errors.Is and errors.As.
func ExampleStartError() {
	_, err := mvm.Run(context.Background(), mvm.Config{}, mvm.Cmd{Argv: []string{"no-such-program"}})
	fmt.Println(errors.Is(err, mvm.ErrCommandNotFound))
	// Output:
	// true
}
