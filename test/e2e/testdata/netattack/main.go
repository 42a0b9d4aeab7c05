// Command netattack is run in the guest, as root, by the network tests:
// it does what a hostile program would do to the host's side of the
// network (open thousands of connections, flood handshakes) and what a
// plain one does with UDP, and prints what it saw.
//
//	netattack conns HOST:PORT N   open N connections at once, hold them until stdin ends
//	netattack synflood IP PORT N  send N handshakes from random ports, never finishing one
//	netattack udp HOST:PORT MSG   send MSG as one datagram and print the answer
package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: netattack conns|synflood|udp ...")
	}
	var err error
	switch os.Args[1] {
	case "conns":
		err = conns(os.Args[2], atoi(os.Args[3]))
	case "synflood":
		err = synflood(os.Args[2], atoi(os.Args[3]), atoi(os.Args[4]))
	case "udp":
		err = udp(os.Args[2], os.Args[3])
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "netattack:", msg)
	os.Exit(1)
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fail(err.Error())
	}
	return n
}

// conns opens n connections to addr at once and holds those that opened
// until stdin ends; it prints how many opened and how many failed.
func conns(addr string, n int) error {
	lim := syscall.Rlimit{Cur: uint64(n + 64), Max: uint64(n + 64)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raise the descriptor limit: %w", err)
	}
	var opened, failed atomic.Int64
	var mu sync.Mutex
	var held []net.Conn
	var wg sync.WaitGroup
	gate := make(chan struct{}, 256) // the guest's own kernel is small
	for range n {
		wg.Add(1)
		gate <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-gate }()
			c, err := net.DialTimeout("tcp4", addr, 30*time.Second)
			if err != nil {
				failed.Add(1)
				return
			}
			opened.Add(1)
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}()
	}
	wg.Wait()
	fmt.Printf("opened %d failed %d\n", opened.Load(), failed.Load())
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range held {
		c.Close()
	}
	return nil
}

// synflood sends n TCP SYNs to ip:port from random source ports through a
// raw socket: no socket of the guest's owns them, so none completes.
func synflood(ip string, port, n int) error {
	dst := net.ParseIP(ip).To4()
	if dst == nil {
		return fmt.Errorf("not an IPv4 address: %q", ip)
	}
	src, err := localAddr(dst)
	if err != nil {
		return err
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
	if err != nil {
		return fmt.Errorf("raw socket: %w", err)
	}
	defer syscall.Close(fd)
	to := &syscall.SockaddrInet4{}
	copy(to.Addr[:], dst)
	for i := range n {
		seg := syn(src, dst, uint16(10000+rand.IntN(50000)), uint16(port), rand.Uint32())
		// A full transmit queue (ENOBUFS) is waited out, as a flooder
		// would: the flood goes at the rate the guest's NIC takes.
		for tries := 0; ; tries++ {
			err := syscall.Sendto(fd, seg, 0, to)
			if err == nil {
				break
			}
			if !errors.Is(err, syscall.ENOBUFS) || tries >= 5000 {
				return fmt.Errorf("send %d: %w", i, err)
			}
			time.Sleep(time.Millisecond)
		}
	}
	fmt.Printf("sent %d\n", n)
	return nil
}

func localAddr(dst net.IP) (net.IP, error) {
	c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: dst, Port: 9})
	if err != nil {
		return nil, fmt.Errorf("find the guest's address: %w", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).IP.To4(), nil
}

// syn is a TCP header with only SYN set, its checksum over the pseudo
// header.
func syn(src, dst net.IP, sport, dport uint16, seq uint32) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], seq)
	h[12] = 5 << 4
	h[13] = 0x02
	binary.BigEndian.PutUint16(h[14:], 64240)
	pseudo := append(append(append([]byte(nil), src...), dst...), 0, syscall.IPPROTO_TCP, 0, 20)
	var sum uint32
	for _, b := range [][]byte{pseudo, h} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(h[16:], ^uint16(sum))
	return h
}

// udp sends msg to addr and prints the first answer, or fails after 5 s.
func udp(addr, msg string) error {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("no answer: %w", err)
	}
	fmt.Printf("answer %q\n", buf[:n])
	return nil
}
