package main

import (
	"bytes"
	"encoding/binary"
)

// Every payload is written in full by its sender and read in full by its
// receiver, at memory speed (memmove and memcmp), so that the benchmark
// measures the transport rather than a byte loop: a request for call seq
// holds seq in its first 8 bytes and then the bytes of a fixed pseudo-random
// pattern from an offset derived from seq; the response holds ^seq and the
// pattern from another offset. The server checks every byte of the request
// and writes every byte of the response; the client checks every byte of
// the response. Payloads shorter than 8 bytes carry seq's low bytes.
const (
	reqMix  = 0x9E3779B97F4A7C15
	respMix = 0xC2B2AE3D27D4EB4F
	minSize = 8
	patSpan = 64 << 10
)

// pattern is the same in every process (a fixed xorshift sequence), as long
// as the largest payload plus patSpan.
var pattern = func() []byte {
	p := make([]byte, 4<<20+patSpan+8)
	x := uint64(0x243F6A8885A308D3)
	for i := 0; i+8 <= len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[i:], x)
	}
	return p
}()

func fillRequest(p []byte, seq uint64)        { fill(p, seq, reqMix) }
func fillResponse(p []byte, seq uint64)       { fill(p, ^seq, respMix) }
func checkRequest(p []byte, seq uint64) bool  { return check(p, seq, reqMix) }
func checkResponse(p []byte, seq uint64) bool { return check(p, ^seq, respMix) }

// requestSeq returns the call sequence number a request carries.
func requestSeq(p []byte) uint64 {
	if len(p) < 8 {
		return 0
	}
	return binary.LittleEndian.Uint64(p)
}

func patternAt(base, mix uint64, n int) []byte {
	off := (base * mix) % patSpan
	return pattern[off : off+uint64(n)]
}

func fill(p []byte, base, mix uint64) {
	if len(p) < 8 {
		for i := range p {
			p[i] = byte(base >> (8 * i))
		}
		return
	}
	binary.LittleEndian.PutUint64(p, base)
	copy(p[8:], patternAt(base, mix, len(p)-8))
}

func check(p []byte, base, mix uint64) bool {
	if len(p) < 8 {
		for i := range p {
			if p[i] != byte(base>>(8*i)) {
				return false
			}
		}
		return true
	}
	return binary.LittleEndian.Uint64(p) == base && bytes.Equal(p[8:], patternAt(base, mix, len(p)-8))
}

// serveRequest checks a whole request and fills a whole response of the
// same size; it is what every server does with every call.
func serveRequest(req, resp []byte) (uint64, error) {
	seq := requestSeq(req)
	if !checkRequest(req, seq) {
		return seq, errCorruptRequest
	}
	fillResponse(resp, seq)
	return seq, nil
}
