package main

import "testing"

func TestPayload_RoundTrip(t *testing.T) {
	for _, n := range []int{1, 7, 8, 9, 64, 1000, 64 << 10, 4 << 20} {
		req := make([]byte, n)
		fillRequest(req, 12345)
		if n >= 8 && requestSeq(req) != 12345 {
			t.Fatalf("size %d: requestSeq = %d", n, requestSeq(req))
		}
		if !checkRequest(req, 12345) {
			t.Fatalf("size %d: request does not check", n)
		}
		if n >= 8 {
			resp := make([]byte, n)
			if _, err := serveRequest(req, resp); err != nil {
				t.Fatalf("size %d: %v", n, err)
			}
			if !checkResponse(resp, 12345) {
				t.Fatalf("size %d: response does not check", n)
			}
			if checkResponse(resp, 12346) {
				t.Fatalf("size %d: response checks for another call", n)
			}
		}
	}
}

func TestPayload_DetectsEveryByte(t *testing.T) {
	p := make([]byte, 4096)
	fillResponse(p, 7)
	for _, i := range []int{0, 7, 8, 100, 4095} {
		p[i] ^= 1
		if checkResponse(p, 7) {
			t.Fatalf("flipped byte %d not detected", i)
		}
		p[i] ^= 1
	}
	if !checkResponse(p, 7) {
		t.Fatal("restored payload does not check")
	}
}
