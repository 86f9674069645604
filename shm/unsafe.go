package shm

import "unsafe"

// All pointer arithmetic over mapped memory lives in this file. Callers check
// bounds before they call these helpers; the helpers only assert them again
// where a wrong value would read outside the mapping.

// at returns a pointer to a T at byte offset off of the mapping m.
// The caller guarantees off+sizeof(T) <= len(m) and alignment of off.
func at[T any](m []byte, off uint64) *T {
	var zero T
	if off+uint64(unsafe.Sizeof(zero)) > uint64(len(m)) {
		panic("shm: internal error: structure outside mapping")
	}
	return (*T)(unsafe.Pointer(&m[off]))
}

// span returns m[off:off+n] with capacity limited to n, after checking the
// range; ok is false if the range does not fit in m.
func span(m []byte, off, n uint64) ([]byte, bool) {
	end := off + n
	if end < off || end > uint64(len(m)) {
		return nil, false
	}
	return m[off:end:end], true
}

// sliceAt returns the n Ts starting at byte offset off of m, checking that
// they lie inside m.
func sliceAt[T any](m []byte, off, n uint64) []T {
	var zero T
	sz := uint64(unsafe.Sizeof(zero))
	if n == 0 {
		return nil
	}
	if n > uint64(len(m))/sz || off > uint64(len(m))-n*sz {
		panic("shm: internal error: array outside mapping")
	}
	return unsafe.Slice((*T)(unsafe.Pointer(&m[off])), n)
}

// addrOf is the address of m's first byte (of its backing array when m is
// empty), for range checks that must not dereference m.
func addrOf(m []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(m))) }

// inside reports whether b lies within [base, base+n).
func inside(b []byte, base uintptr, n uint64) bool {
	p := addrOf(b)
	return p >= base && uint64(p-base)+uint64(len(b)) <= n
}
