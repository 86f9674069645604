package shm

import "syscall"

// osYield gives up the CPU to another runnable thread (sched_yield).
func osYield() { syscall.Syscall(syscall.SYS_SCHED_YIELD, 0, 0, 0) }
