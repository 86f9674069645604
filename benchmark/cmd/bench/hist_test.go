package main

import (
	"math"
	"testing"
)

func TestHist_Quantiles(t *testing.T) {
	var h hist
	for v := int64(1); v <= 100000; v++ {
		h.record(v * 10) // 10 ns .. 1 ms, uniform
	}
	for _, c := range []struct{ q, want float64 }{{0.5, 500000}, {0.99, 990000}, {0.999, 999000}} {
		got := h.quantile(c.q)
		if math.Abs(got-c.want)/c.want > 0.01 {
			t.Errorf("quantile(%v) = %v, want %v within 1%%", c.q, got, c.want)
		}
	}
	if h.max != 1000000 || h.n != 100000 {
		t.Errorf("max %d n %d", h.max, h.n)
	}
}

func TestHist_IndexMonotonic(t *testing.T) {
	prev := -1
	for v := uint64(0); v < 1<<20; v += 7 {
		i := histIndex(v)
		if i < prev {
			t.Fatalf("index of %d is %d, below %d", v, i, prev)
		}
		if lo := histValue(i); math.Abs(lo-float64(v)) > float64(v)/100+1 {
			t.Fatalf("bucket %d of %d has midpoint %v", i, v, lo)
		}
		prev = i
	}
}

func TestParseList(t *testing.T) {
	got, err := parseList("64, 1K,16k,4M")
	if err != nil {
		t.Fatal(err)
	}
	want := []int{64, 1 << 10, 16 << 10, 4 << 20}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("parseList = %v, want %v", got, want)
		}
	}
	if _, err := parseList("x"); err == nil {
		t.Fatal("parseList accepted x")
	}
}
