package shm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// region is one mapped memfd: ours (read-write) or the peer's (read-only).
type region struct {
	mem   []byte // the original mmap slice; unmapped exactly once
	fd    int    // the memfd; -1 once closed
	hdr   *regionHeader
	geo   geometry
	ring  []desc
	rel   []uint64
	slots []slotMeta
	arena []byte
}

const requiredSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW

// createRegion makes our base region: a sealed memfd of size bytes, pages
// reserved up front and pre-faulted, mapped read-write, header written.
// maxTotal is our limit on all our regions together (the peer checks
// maxMessage against it).
func createRegion(size, ringEntries, relEntries, slotCount, maxMessage, maxTotal uint64, role uint32, peerPID int32) (*region, error) {
	g := computeGeometry(size, ringEntries, relEntries, slotCount)
	g.maxMessage, g.maxTotal = maxMessage, maxTotal
	if g.arenaSize == 0 || maxMessage > max(g.arenaSize, maxTotal) {
		return nil, fmt.Errorf("%w: region of %d bytes leaves an arena of %d bytes, smaller than the maximum message (%d)",
			ErrBadConfig, size, g.arenaSize, maxMessage)
	}
	r, err := newRegionMemory(size)
	if err != nil {
		return nil, err
	}
	r.geo = g
	h := at[regionHeader](r.mem, 0)
	*h = regionHeader{
		Magic: regionMagic, Version: layoutVersion, HeaderSize: headerSize, Size: size,
		RingOff: g.ringOff, RingEntries: uint32(g.ringEntries), DescSize: descSize,
		RelOff: g.relOff, RelEntries: uint32(g.relEntries), SlotCount: uint32(g.slotCount), SlotOff: g.slotOff,
		ArenaOff: g.arenaOff, ArenaSize: g.arenaSize, MaxMessage: maxMessage, BlockSize: MinBlockSize,
		PID: uint32(os.Getpid()), CreatedUnix: time.Now().UnixNano(), Role: role, PeerPID: uint32(peerPID),
		MaxTotal: maxTotal,
	}
	r.bind()
	return r, nil
}

// createGrownRegion makes grown region index of size bytes (header and
// arena only), created, reserved, pre-faulted and sealed like the base one.
func createGrownRegion(size uint64, index uint32, maxMessage, maxTotal uint64, role uint32, peerPID int32) (*region, error) {
	g := computeGrownGeometry(size)
	g.maxMessage, g.maxTotal, g.index = maxMessage, maxTotal, index
	r, err := newRegionMemory(size)
	if err != nil {
		return nil, err
	}
	r.geo = g
	h := at[regionHeader](r.mem, 0)
	*h = regionHeader{
		Magic: regionMagic, Version: layoutVersion, HeaderSize: headerSize, Size: size, DescSize: descSize,
		ArenaOff: g.arenaOff, ArenaSize: g.arenaSize, MaxMessage: maxMessage, BlockSize: MinBlockSize,
		PID: uint32(os.Getpid()), CreatedUnix: time.Now().UnixNano(), Role: role, PeerPID: uint32(peerPID),
		Region: index, MaxTotal: maxTotal,
	}
	r.bind()
	return r, nil
}

// newRegionMemory makes a sealed memfd of size bytes with every page
// reserved, maps it read-write and pre-faults the mapping.
func newRegionMemory(size uint64) (*region, error) {
	if err := checkMemoryAvailable(size); err != nil {
		return nil, err
	}
	fd, err := unix.MemfdCreate(fmt.Sprintf("kshm-%d", os.Getpid()), unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("shm: memfd_create: %w", err)
	}
	fail := func(what string, err error) (*region, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("shm: %s: %w", what, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fail("ftruncate region", err)
	}
	// Reserve every page now: a region the machine cannot back fails here
	// with an error instead of a SIGBUS on first touch.
	if err := unix.Fallocate(fd, 0, 0, int64(size)); err != nil {
		if err == unix.ENOSPC || err == unix.ENOMEM {
			return fail("reserve region pages", fmt.Errorf("%w: %d bytes: %v", ErrInsufficientMemory, size, err))
		}
		return fail("reserve region pages", err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap region", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS,
		unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_FUTURE_WRITE|unix.F_SEAL_SEAL); err != nil {
		unix.Munmap(mem)
		return fail("seal region", err)
	}
	prefault(mem, unix.MADV_POPULATE_WRITE)
	return &region{mem: mem, fd: fd}, nil
}

// prefault maps every page of mem now (first touches cost 10-40 µs a page
// otherwise). Kernels before 5.14 refuse the advice; that only costs the
// faults later, so the error is not reported.
func prefault(mem []byte, advice int) {
	// Best effort: Linux before 5.14 refuses the advice (EINVAL), and under
	// memory pressure it may stop early; the pages then fault in on use.
	if err := unix.Madvise(mem, advice); err != nil {
		return
	}
}

// mapPeerRegion maps the peer's memfd read-only and validates it. The
// descriptor is consumed (closed) in every case.
func mapPeerRegion(fd int, maxRegion uint64) (*region, error) {
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%w: fstat peer region: %v", ErrHandshake, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%w: peer region is not a memfd (mode %o)", ErrHandshake, st.Mode)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: peer region is not a sealable memfd: %v", ErrHandshake, err)
	}
	if seals&requiredSeals != requiredSeals {
		return nil, fmt.Errorf("%w: peer region is not sealed against resizing (seals %#x)", ErrHandshake, seals)
	}
	size := uint64(st.Size)
	if size < headerSize || size > maxRegion {
		return nil, fmt.Errorf("%w: peer region size %d out of range [%d, %d]", ErrHandshake, size, headerSize, maxRegion)
	}
	// Its pages must be reserved already: reading a sparse region would
	// fault pages in and charge them to us.
	if reserved := uint64(st.Blocks) * 512; reserved < size {
		return nil, fmt.Errorf("%w: peer region of %d bytes has only %d bytes of pages reserved", ErrHandshake, size, reserved)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap peer region: %v", ErrHandshake, err)
	}
	r := &region{mem: mem, fd: -1}
	r.hdr = at[regionHeader](mem, 0)
	g, err := validateHeader(r.hdr, size)
	if err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	r.geo = g
	r.bind()
	prefault(mem, unix.MADV_POPULATE_READ)
	return r, nil
}

// bind creates the typed views over the mapping from r.geo.
func (r *region) bind() {
	g := r.geo
	r.hdr = at[regionHeader](r.mem, 0)
	if g.index != 0 {
		r.arena, _ = span(r.mem, g.arenaOff, g.arenaSize)
		return
	}
	r.ring = sliceAt[desc](r.mem, g.ringOff, g.ringEntries)
	r.rel = sliceAt[uint64](r.mem, g.relOff, g.relEntries)
	r.slots = sliceAt[slotMeta](r.mem, g.slotOff, g.slotCount)
	r.arena, _ = span(r.mem, g.arenaOff, g.arenaSize)
}

// unmap releases the mapping and the descriptor. Call once, when no slice
// into the mapping can still be read.
func (r *region) unmap() {
	if r.mem != nil {
		unix.Munmap(r.mem)
		r.mem = nil
	}
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

// checkMemoryAvailable refuses a region larger than the memory the machine
// and our memory cgroup can still give, reading both read-only.
func checkMemoryAvailable(size uint64) error {
	avail, src := memAvailable()
	if src != "" && size > avail {
		return fmt.Errorf("%w: region of %d bytes (%d MiB) exceeds the %d MiB available (%s)",
			ErrInsufficientMemory, size, size>>20, avail>>20, src)
	}
	return nil
}

// memAvailable returns the smaller of MemAvailable and the memory cgroup's
// remaining limit, and which one it was; 0 if neither can be read.
func memAvailable() (uint64, string) {
	var best uint64
	src := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) >= 2 && f[0] == "MemAvailable:" {
				if kb, err := strconv.ParseUint(f[1], 10, 64); err == nil {
					best, src = kb*1024, "MemAvailable in /proc/meminfo"
				}
			}
		}
	}
	if rem, ok := cgroupRemaining(); ok && (best == 0 || rem < best) {
		best, src = rem, "memory cgroup limit"
	}
	return best, src
}

// cgroupRemaining reads memory.max - memory.current of our cgroup (v2).
func cgroupRemaining() (uint64, bool) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if !strings.HasPrefix(line, "0::") {
			continue
		}
		dir := "/sys/fs/cgroup" + strings.TrimPrefix(line, "0::")
		max, err1 := os.ReadFile(dir + "/memory.max")
		cur, err2 := os.ReadFile(dir + "/memory.current")
		if err1 != nil || err2 != nil {
			return 0, false
		}
		ms := strings.TrimSpace(string(max))
		if ms == "max" {
			return 0, false
		}
		m, err1 := strconv.ParseUint(ms, 10, 64)
		c, err2 := strconv.ParseUint(strings.TrimSpace(string(cur)), 10, 64)
		if err1 != nil || err2 != nil {
			return 0, false
		}
		if c >= m {
			return 0, true
		}
		return m - c, true
	}
	return 0, false
}
