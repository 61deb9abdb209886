"""procsync's benchmarks against every peer, side by side (issue 6).

Run ``make bench`` (about ten minutes) or ``make bench-quick`` (about one), or
``python -m benchmarks --help``. Layout:

    impls.py      the contenders: procsync (sync, asyncio) and every peer, behind
                  one small adapter each (acquire/release/set/wait/clear)
    loops.py      what each benchmark process does, written once as a generator of
                  primitive operations and driven by a blocking or an asyncio driver
    run.py        the scenarios, the private servers, statistics, the JSON record
    fleet.py      heartbeat cost: many simulated sessions driving session.lua
    report.py     the results table (terminal, docs/benchmarks.md)
    profile.py    where procsync's time goes (cProfile, pyinstrument, py-spy,
                  INFO commandstats)
    chaos.py      ``make chaos``: a bounded nemesis run (faults through FaultProxy,
                  server pauses and crashes) under workers doing fenced writes;
                  counts overlapping holds, token repeats, stuck workers, overruns

Every loop is bounded in count and in time; every server is private (a Unix socket
in a temporary directory, started by procsync.testing.ServerProcess) and stopped by
its own pid at the end.
"""
