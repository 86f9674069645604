package main

import "encoding/binary"

// Every payload is written in full by its sender and read in full by its
// receiver: a request for call seq holds, in its i-th 8-byte word,
// seq ^ (i*reqMix); the response holds ^seq ^ (i*respMix). The server learns
// seq from the first word of the request, checks every word, and writes
// every word of the response; the client checks every word of the response.
const (
	reqMix  = 0x9E3779B97F4A7C15
	respMix = 0xC2B2AE3D27D4EB4F
	minSize = 8
)

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

func fill(p []byte, base, mix uint64) {
	n := len(p) &^ 7
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], base^(uint64(i)*mix))
	}
	for i := n; i < len(p); i++ {
		p[i] = byte(base ^ (uint64(i) * mix))
	}
}

func check(p []byte, base, mix uint64) bool {
	n := len(p) &^ 7
	var diff uint64
	for i := 0; i < n; i += 8 {
		diff |= binary.LittleEndian.Uint64(p[i:]) ^ (base ^ (uint64(i) * mix))
	}
	for i := n; i < len(p); i++ {
		diff |= uint64(p[i] ^ byte(base^(uint64(i)*mix)))
	}
	return diff == 0
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
