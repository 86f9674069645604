package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"

	"github.com/shmkit/kshm/shm"
)

// region is one kshm region of the inspected process, mapped read-only.
type region struct {
	fd   int    // descriptor number in the process
	path string // /proc/PID/fd/N
	info shm.RegionInfo
	err  error // the region could not be read or validated (info is zero)
}

// regions maps every kshm region of pid read-only and describes it. Call
// unmap when done with the infos (their Data slices point into the maps).
// The error explains in words when the OS refuses access.
func regions(pid int) (rs []region, unmap func(), err error) {
	files, err := shm.RegionFiles(pid)
	if err != nil {
		return nil, nil, explain(pid, err)
	}
	var unmaps []func()
	unmap = func() {
		for _, u := range unmaps {
			u()
		}
	}
	for _, f := range files {
		n, _ := strconv.Atoi(filepath.Base(f))
		r := region{fd: n, path: f}
		mem, um, err := shm.MapRegionFile(f)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // closed since we listed it: the session is gone
		case err != nil:
			r.err = explain(pid, err)
		default:
			unmaps = append(unmaps, um)
			r.info, r.err = shm.InspectRegion(mem)
		}
		rs = append(rs, r)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].fd < rs[j].fd })
	return rs, unmap, nil
}

// explain turns an error reading /proc/PID into a message an operator can
// act on.
func explain(pid int, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH):
		if _, serr := os.Stat(fmt.Sprintf("/proc/%d", pid)); serr != nil {
			return fmt.Errorf("no process with pid %d", pid)
		}
		return fmt.Errorf("pid %d: %v", pid, err)
	case errors.Is(err, fs.ErrPermission):
		owner := ""
		if fi, serr := os.Stat(fmt.Sprintf("/proc/%d", pid)); serr == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				owner = fmt.Sprintf(" (it runs as uid %d; we are uid %d)", st.Uid, os.Geteuid())
			}
		}
		return fmt.Errorf("permission denied reading the descriptors of pid %d%s: "+
			"run kshm as the same user, or as root or with CAP_SYS_PTRACE (%v)", pid, owner, err)
	}
	return fmt.Errorf("pid %d: %w", pid, err)
}
