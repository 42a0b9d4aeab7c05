package network

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// dnsTTL is the TTL of every answer: short, so that a guest asks again
// (and the policy sees it) rather than keeping addresses for long.
const dnsTTL = 60

// lookupTimeout bounds one host lookup for the guest.
const lookupTimeout = 5 * time.Second

// LookupFunc resolves a host name to IPv4 addresses on the host.
type LookupFunc func(ctx context.Context, host string) ([]netip.Addr, error)

// HostLookup is the host's resolver.
func HostLookup(ctx context.Context, host string) ([]netip.Addr, error) {
	return net.DefaultResolver.LookupNetIP(ctx, "ip4", host)
}

// resolver is the guest's DNS server: it answers A queries of names the
// policy allows with the host's answers (remembering them, so that the
// guest may connect there), every other allowed query with no data, and
// names the policy does not allow with NXDOMAIN.
type resolver struct {
	p      *Policy
	lookup LookupFunc
	log    *slog.Logger
}

// answer is the reply to one query message from the guest, or nil for a
// message that deserves none (not a query, or unparsable). maxSize is
// the transport's limit (512 for UDP without EDNS).
func (r *resolver) answer(ctx context.Context, query []byte, maxSize int) []byte {
	var m dns.Msg
	if err := m.Unpack(query); err != nil || m.Response {
		return nil
	}
	resp := new(dns.Msg)
	resp.SetReply(&m)
	resp.RecursionAvailable = true
	switch {
	case m.Opcode != dns.OpcodeQuery:
		resp.Rcode = dns.RcodeNotImplemented
	case len(m.Question) != 1 || m.Question[0].Qclass != dns.ClassINET:
		resp.Rcode = dns.RcodeFormatError
	default:
		r.resolve(ctx, m.Question[0], resp)
		r.log.Debug("network: DNS", "name", m.Question[0].Name, "type", dns.TypeToString[m.Question[0].Qtype], "rcode", dns.RcodeToString[resp.Rcode], "answers", len(resp.Answer))
	}
	if opt := m.IsEdns0(); opt != nil && int(opt.UDPSize()) > maxSize {
		maxSize = int(min(opt.UDPSize(), 4096))
	}
	resp.Truncate(maxSize)
	b, err := resp.Pack()
	if err != nil {
		return nil
	}
	return b
}

func (r *resolver) resolve(ctx context.Context, q dns.Question, resp *dns.Msg) {
	name := strings.ToLower(strings.TrimSuffix(q.Name, "."))
	a := func(ips ...netip.Addr) {
		if q.Qtype != dns.TypeA {
			return // no data for other types: the guest has IPv4 only
		}
		for _, ip := range ips {
			resp.Answer = append(resp.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: dnsTTL},
				A:   ip.AsSlice(),
			})
		}
	}
	if name == HostName {
		a(Gateway)
		return
	}
	if ip, static := r.p.static[name]; static {
		a(ip)
		return
	}
	ports, ok := r.p.allowedPorts(name)
	if !ok || checkHostName(name) != nil {
		r.log.Info("network: DNS query refused", "name", name, "why", "not an allowed host name")
		resp.Rcode = dns.RcodeNameError
		return
	}
	if q.Qtype != dns.TypeA {
		return
	}
	lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	addrs, err := r.lookup(lctx, name)
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		resp.Rcode = dns.RcodeNameError
		return
	case err != nil:
		r.log.Debug("network: host lookup failed", "name", name, "err", err)
		resp.Rcode = dns.RcodeServerFailure
		return
	}
	var v4 []netip.Addr
	for _, ip := range addrs {
		if ip = ip.Unmap(); ip.Is4() {
			v4 = append(v4, ip)
		}
	}
	if len(v4) > 16 {
		v4 = v4[:16]
	}
	if !r.p.open && !r.p.remember(v4, ports) {
		r.log.Warn("network: the guest resolved too many addresses; refusing more", "max", MaxResolved)
		resp.Rcode = dns.RcodeServerFailure
		return
	}
	a(v4...)
}
