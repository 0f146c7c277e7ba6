"""Drop-in pieces for other trainers; each module imports its trainer library lazily (`fastprime[trl]`)."""
