package main

// kitexTransports: the echo service over kshm, netpoll-uds and netpoll-tcp
// (filled in when the transport and the example land).
func kitexTransports() []transportDef { return nil }
