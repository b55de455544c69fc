"""The adaptive controller's tunables (`jorbmp.adaptive`), each with its trade-off.

One place for them: the windows, the noise model, the slow start, the sequential
tests and the prober all read the same yardsticks (`DECISIVE`, `WORTH`, ...), and a
change to one shows here next to the others it balances against.
"""

from __future__ import annotations

# Execs at the limit a window lasts for, and its least length in mean exec times
# (execs overlapping its ends count for a small share of it): a window's count is not
# one exec's luck. More: slower decisions. And the fewest updates in a window: with
# three, a window brings its own estimate of the noise (with two degrees of freedom).
WINDOW_EXECS = 20
WINDOW_LATENCIES = 2.0
WINDOW_UPDATES = 3
# Updates holding fewer execs than this on average mostly show their rounding: such a
# window brings no estimate of the noise (and until one does, counts are assumed as
# noisy as Poisson ones, 1 / rate).
UPDATE_EXECS = 3
# Execs the first window, which only measures the exec time, waits for (its count
# decides its end, so its rate would be biased).
FIRST_EXECS = 5
# Mean exec times after a limit change before a window starts.
SETTLE_LATENCIES = 1.0
# Slow start (the first climb): a level passes once START_EXECS execs, and as many as
# the limit, have finished since the change, over START_UPDATES updates at least (two:
# a window then brings an estimate of the noise) and one mean exec time. Fewer: faster
# growth, more overshoot when queueing shows late.
START_EXECS = 4
START_UPDATES = 2
# A doubled level is judged on its own execs, those started at it (after the execs in
# flight at the change, which a first-come-first-served service finishes first, at the
# old level's pace): once as many have finished as it added slots, it passes if their
# mean exec time lies START_CLEAR standard deviations below the `QUEUEING` bar, else
# once all its slots' worth have, unless they queue. The added slots' execs may have
# waited little (the old ones about to finish at the change): those started after
# them show the queue. Higher: fewer passes on that luck, slower growth where exec
# times are noisy; at 0 (or the added slots' worth alone), FIFO services overshoot.
START_CLEAR = 0.5
# A level's measurement keeps BASE_WINDOWS windows' worth of seconds at most (older
# ones fade in proportion): more, less noise; fewer, fresher after a change.
BASE_WINDOWS = 30
# A probe is decided once its worth lies CONFIDENT standard deviations beyond the bar
# (DECISIVE in its first PROBE_WINDOWS windows: early looks need more), or once the
# wrong choice could cost at most RESOLUTION of the throughput (at CONFIDENT
# deviations), or after PROBE_CAP windows. It starts once the base's own share of the
# deviation of worth is at most BASE_RESOLUTION (or the base has PROBE_CAP windows):
# a probe compared against one noisy window of the base would decide on its luck.
# The limit measures where the variance is SWITCH times the other side's.
PROBE_WINDOWS = 3
PROBE_CAP = 25
DECISIVE = 2.5
CONFIDENT = 2.0
RESOLUTION = 0.05
BASE_RESOLUTION = 0.14
SWITCH = 2.0
# The noise of throughput (relative variance over one second) assumed at first (5%
# per 0.1 s) and weighted as NOISE_PRIOR_DF degrees of freedom; the least ever assumed
# (2% per 0.1 s: counts are never that exact); that of a mean exec time per exec at
# first (a CV of 0.3). The running estimates are means of what the windows bring until
# NOISE_WEIGHT is the weight of each (more: follows change sooner, wobbles more).
NOISE_FIRST = 0.05**2 * 0.1
NOISE_PRIOR_DF = 1
MIN_NOISE = 0.02**2 * 0.1
LAT_NOISE_FIRST = 0.3**2
NOISE_WEIGHT = 0.05
# The worth of the extra slots (throughput gained over what they would add at
# constant latency) at which the higher level wins: below it, slots cost more latency
# than they bring; above it, they are worth their keep. MARGIN is the incumbent's edge.
WORTH = 0.5
MARGIN = 0.2
# A level's exec time above the least seen by this share (and by DECISIVE times its
# noise) means execs queue for something: a climbing limit then probes down by the
# queueing share at once. LAT_MIN_FORGET: the share of the gap to a measurement's
# mean exec time the least closes per measurement, so a least measured long ago (a
# faster service then) does not stay forever.
QUEUEING = 0.2
LAT_MIN_FORGET = 0.02
# The base step as a share of the limit: probes change the limit by ~10%, enough to see
# over the noise, small enough that a settled limit stays within a step of its level.
STEP_SHARE = 0.1
# Seconds a settled limit holds before probing again: the first hold, and the most it
# doubles to; and at least HOLD_PER_PROBE times the last probe's length (noisy counts
# make probes long: probing then still takes at most a third of the time). Longer
# holds cost less throughput in probes, and see a rise later.
HOLD_FIRST = 0.5
HOLD_MAX = 2.0
HOLD_PER_PROBE = 2.0
# A settled level's throughput moving by more than this share (or DECISIVE times a
# window's noise, if more) means the world changed.
DRIFT = 0.3
# Limit changes kept in `LimitHistory.changes`; older ones are thinned, every other one
# dropped, when there are more.
HISTORY_MAX = 200
