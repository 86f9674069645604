//go:build race

package main

// shmipc-go v0.2.0 has data races of its own that the race detector reports
// (in its stream and dispatcher code), so the smoke test leaves it out of
// race builds.
const raceEnabled = true
