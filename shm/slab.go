package shm

// buddy is the process-local allocator of one arena. Blocks are powers of
// two from MinBlockSize up to the largest that fits, so any allocation up to
// the maximum message size is contiguous. It is not safe for concurrent use;
// the session serialises calls with its allocation lock.
//
// Free blocks of each order form a doubly linked list threaded through
// next/prev (indexed by block number, one block = MinBlockSize bytes).
// head[i] is order+1 when block i starts a free block of that order, else 0.
type buddy struct {
	nblocks  uint32
	maxOrder uint8
	head     []uint8
	next     []int32
	prev     []int32
	free     [32]int32 // first free block of each order, -1 if none
	freeLen  uint64    // bytes free
}

func newBuddy(arenaSize uint64) *buddy {
	n := uint32(arenaSize / MinBlockSize)
	b := &buddy{
		nblocks: n,
		head:    make([]uint8, n),
		next:    make([]int32, n),
		prev:    make([]int32, n),
	}
	for i := range b.free {
		b.free[i] = -1
	}
	for uint32(1)<<(b.maxOrder+1) <= n {
		b.maxOrder++
	}
	// Carve the arena greedily into the largest aligned blocks that fit.
	for idx := uint32(0); idx < n; {
		k := b.maxOrder
		for k > 0 && (idx&(1<<k-1) != 0 || idx+1<<k > n) {
			k--
		}
		b.push(idx, k)
		b.freeLen += MinBlockSize << k
		idx += 1 << k
	}
	return b
}

// orderFor returns the order of the smallest block holding n bytes.
func orderFor(n uint64) uint8 {
	var k uint8
	for MinBlockSize<<k < n {
		k++
	}
	return k
}

func (b *buddy) push(idx uint32, k uint8) {
	b.head[idx] = k + 1
	b.prev[idx] = -1
	b.next[idx] = b.free[k]
	if f := b.free[k]; f >= 0 {
		b.prev[f] = int32(idx)
	}
	b.free[k] = int32(idx)
}

func (b *buddy) remove(idx uint32, k uint8) {
	b.head[idx] = 0
	p, n := b.prev[idx], b.next[idx]
	if p >= 0 {
		b.next[p] = n
	} else {
		b.free[k] = n
	}
	if n >= 0 {
		b.prev[n] = p
	}
}

// alloc returns the arena offset and order of a block of at least n bytes.
func (b *buddy) alloc(n uint64) (off uint64, order uint8, ok bool) {
	if n == 0 {
		n = 1
	}
	k := orderFor(n)
	if k > b.maxOrder {
		return 0, 0, false
	}
	j := k
	for j <= b.maxOrder && b.free[j] < 0 {
		j++
	}
	if j > b.maxOrder {
		return 0, 0, false
	}
	idx := uint32(b.free[j])
	b.remove(idx, j)
	for j > k { // split, keeping the lower half
		j--
		b.push(idx+1<<j, j)
	}
	b.freeLen -= MinBlockSize << k
	return uint64(idx) * MinBlockSize, k, true
}

// release returns the block at off of the given order, merging buddies.
func (b *buddy) release(off uint64, k uint8) {
	idx := uint32(off / MinBlockSize)
	b.freeLen += MinBlockSize << k
	for k < b.maxOrder {
		bud := idx ^ 1<<k
		if bud+1<<k > b.nblocks || b.head[bud] != k+1 {
			break
		}
		b.remove(bud, k)
		idx &^= 1 << k
		k++
	}
	b.push(idx, k)
}

// largestFree returns the size of the largest free block.
func (b *buddy) largestFree() uint64 {
	for k := int(b.maxOrder); k >= 0; k-- {
		if b.free[k] >= 0 {
			return MinBlockSize << k
		}
	}
	return 0
}
