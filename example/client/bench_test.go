package main

import (
	"bytes"
	"testing"
)

func TestStamp_MarksBothEnds(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 15, 16, 64, 1 << 20} {
		a, b := make([]byte, n), make([]byte, n)
		fill(a, 5)
		fill(b, 5)
		stamp(a, 1)
		stamp(b, 2)
		if n > 0 && bytes.Equal(a, b) {
			t.Errorf("size %d: different seqs give equal payloads", n)
		}
		if n >= 16 && (bytes.Equal(a[:8], b[:8]) || bytes.Equal(a[n-8:], b[n-8:])) {
			t.Errorf("size %d: a stamp is missing at one end", n)
		}
	}
}

func TestFill_DependsOnSeed(t *testing.T) {
	a, b := make([]byte, 4096), make([]byte, 4096)
	fill(a, 1)
	fill(b, 2)
	same := 0
	for i := range a {
		if a[i] == b[i] {
			same++
		}
	}
	if same > len(a)/16 {
		t.Errorf("payloads of different seeds agree in %d of %d bytes", same, len(a))
	}
}

func TestParseSizes(t *testing.T) {
	got, err := parseSizes("64, 1024,0")
	if err != nil || len(got) != 3 || got[0] != 64 || got[1] != 1024 || got[2] != 0 {
		t.Fatalf("parseSizes: %v, %v", got, err)
	}
	for _, bad := range []string{"", "x", "-1", "64,,1"} {
		if _, err := parseSizes(bad); err == nil {
			t.Errorf("parseSizes(%q) accepted", bad)
		}
	}
}

func TestSizeString(t *testing.T) {
	for n, want := range map[int]string{64: "64 B", 1024: "1 KiB", 1536: "1536 B", 1 << 20: "1 MiB", 256 << 10: "256 KiB"} {
		if got := sizeString(n); got != want {
			t.Errorf("sizeString(%d) = %q, want %q", n, got, want)
		}
	}
}
