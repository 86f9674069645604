package main

// kshmEngineTransports: the shm engine in each wake-up mode (filled in when
// the shm package compiles).
func kshmEngineTransports() []transportDef { return nil }
