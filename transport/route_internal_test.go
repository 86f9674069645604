package transport

import (
	"net"
	"net/netip"
	"testing"
	"time"

	kconnpool "github.com/cloudwego/kitex/pkg/connpool"
	"github.com/cloudwego/kitex/pkg/remote/connpool"
)

func TestRoutePool_DumpReachesFallback(t *testing.T) {
	p := NewRoutePool(DefaultConfig(), "", "", connpool.NewLongPool("svc", kconnpool.IdleConfig{MaxIdlePerAddress: 1, MaxIdleGlobal: 1, MaxIdleTimeout: time.Minute}))
	m, ok := p.Dump().(map[string]interface{})
	if !ok || m["fallback"] == nil {
		t.Fatalf("Dump: %v", p.Dump())
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestAnnounce_Serves(t *testing.T) {
	a := newAnnounce(&net.TCPAddr{IP: net.IPv4zero, Port: 4321})
	b, err := parseAnnounce(mustJSON(t, a))
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{
		"127.0.0.1:4321":   true,
		"localhost:4321":   true,
		"127.0.0.1:4322":   false,
		"10.255.1.2:4321":  false, // not an address of this host
		"example.com:4321": false,
	} {
		ap, ok := normAddr(addr)
		if got := ok && b.serves(target{ap: ap}); got != want {
			t.Errorf("serves(%s) = %v, want %v", addr, got, want)
		}
	}
	// Another host (boot id) or, for loopback, another network namespace.
	other := *b
	other.BootID = "x"
	if other.serves(target{ap: netip.MustParseAddrPort("127.0.0.1:4321")}) {
		t.Error("an announcement from another host serves loopback")
	}
	other = *b
	other.NetNS++
	if other.serves(target{ap: netip.MustParseAddrPort("127.0.0.1:4321")}) {
		t.Error("an announcement from another network namespace serves loopback")
	}
	if _, err := parseAnnounce([]byte("{")); err == nil {
		t.Error("garbage accepted")
	}
}

func mustJSON(t *testing.T, a *announce) []byte {
	t.Helper()
	b, err := jsonMarshal(a)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
