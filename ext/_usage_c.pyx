# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, infer_types=True
"""Step 8, fair usage, native implementation (``gateway._usage_c``).

Behaviour is identical to ``gateway/_usage_py.py``: same decisions, same
headers, same changes to the same state (``gateway.usage.meter.Meter``),
step for step in the same order; see that module for the rules. Everything
off the common path (a counter's first window, refusals, shadow buckets,
buckets keyed by more than the subject) calls the very same Python code
(``gateway.usage.metering``, ``SlidingCounter.slot``), so only the hot path
is written twice.

Why native: in the server the pure step costs about twice its in-process
time (its bytecode competes with the rest of the request for the caches).
Here the rules of a (route, plan) pair are compiled once into C fields, and
a request is plain C arithmetic on the counters' arrays, a few dict
operations and one call to the bucket table.

The arithmetic is the pure step's, operation for operation, in IEEE doubles
(the module is built with ``-ffp-contract=off``, so no fused multiply-add
changes a rounding); ``now // window`` is Python's float floor division.
"""

from cpython.array cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_AsLongLong
from cpython.object cimport PyObject
from libc.math cimport ceil, copysign, floor, fmod
from libc.string cimport memcpy

import time

from gateway.usage.meter import CHARGE_EVERY
from gateway.usage.metering import (
    bucket_keys,
    metering,
    refuse_bandwidth,
    refuse_concurrency,
    refuse_quota,
    refuse_rate,
    shadow_buckets,
    subject_of,
)

__all__ = ["charge", "fair_usage", "leave"]

include "_digits.pxi"
include "_clock.pxi"


cdef inline double _floordiv(double vx, double wx) noexcept:
    """Python's ``vx // wx`` for floats (CPython's float_floor_div), wx != 0."""
    cdef double mod = fmod(vx, wx)
    cdef double div = (vx - mod) / wx
    cdef double floordiv
    if mod:
        if (wx < 0) != (mod < 0):
            div -= 1.0
    if div:
        floordiv = floor(div)
        if div - floordiv > 0.5:
            floordiv += 1.0
    else:
        floordiv = copysign(0.0, vx / wx)
    return floordiv


cdef inline double _weighted(double *s, double now) noexcept:
    # gateway.usage.meter.weighted: index, previous, current, window
    return s[1] * (1.0 - (now - s[0] * s[3]) / s[3]) + s[2]


cdef inline double _until_rollover(double *s, double now) noexcept:
    return (s[0] + 1) * s[3] - now


cdef array _slot(object counter, str key, double window, object window_obj, double now):
    """``SlidingCounter.slot(key, window, now)``: the key's slot rolled to ``now``.
    A slot that is new, or counted over another window, takes the Python path."""
    cdef PyObject *found = PyDict_GetItem(counter._slots, key)
    cdef array slot
    cdef double *s
    if found == NULL:
        return counter.slot(key, window_obj, now)
    slot = <array>found
    s = slot.data.as_doubles
    if s[3] != window:
        return counter.slot(key, window_obj, now)
    # Still in the slot's window, the common case, without a division: for a
    # whole number of seconds and products below 2**53 (all exact),
    # lo <= now < lo + window means now // window == s[0] (fmod is exact, so
    # CPython's float floor division yields the true quotient), and the slot
    # stays as it is, as below.
    cdef double lo = s[0] * window
    if (
        window > 0.0 and window == floor(window) and 0.0 <= lo <= now
        and now < lo + window and lo + window <= 9007199254740992.0
    ):
        return slot
    cdef double index = _floordiv(now, window)
    if s[0] != index:
        # A new window: the current one becomes the previous, unless a whole
        # window passed with nothing counted.
        s[1] = s[2] if s[0] == index - 1 else 0
        s[2] = 0
        s[0] = index
    return slot


cdef bytes _ratelimit(bytes head, long long remaining, double reset):
    """``b'"name";r=' + remaining + b';t=' + ceil(reset)``: ratelimit_header's value."""
    cdef char digits[64]
    cdef int n = _signed_digits(digits, remaining)
    memcpy(digits + n, b";t=", 3)
    n += 3
    n += _signed_digits(digits + n, <long long>ceil(reset))
    cdef Py_ssize_t size = PyBytes_GET_SIZE(head)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size + n)
    cdef char *p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), size)
    memcpy(p + size, digits, n)
    return out


cdef bytes _head(str name):
    return f'"{name}";r='.encode()


cdef class _Quota:
    cdef object rule
    cdef str prefix
    cdef double window
    cdef object window_obj
    cdef double limit
    cdef bint enforce
    cdef bytes head
    cdef str note

    def __init__(self, rule):
        self.rule = rule
        self.prefix = rule.prefix
        self.window = rule.window
        self.window_obj = rule.window
        self.limit = rule.limit
        self.enforce = rule.mode == "enforce"
        self.head = _head(rule.name)
        self.note = f"quota_exceeded:{rule.name}"


cdef class _Concurrent:
    cdef str key  # "" for the subject's
    cdef long long limit
    cdef object limit_obj
    cdef bint enforce
    cdef str note

    def __init__(self, str key, limit, str mode):
        self.key = key
        self.limit = limit
        self.limit_obj = limit
        self.enforce = mode == "enforce"
        self.note = f"concurrency_limited:{key}"


cdef class _Keys:
    """One subject's counter keys under one plan, built once (no string
    concatenation, no hashing of new strings on later requests)."""

    cdef list quota  # aligned with _Plan.quotas
    cdef str bw
    cdef str inflight  # "subject:" + subject
    cdef list bucket  # [the plan bucket's key], the list handed to acquire
    cdef tuple slots  # the in-flight keys, aligned with _Plan.concurrency
    cdef tuple bandwidth  # (bw, window): what req.bandwidth says, or None


# Per (route, plan), then start over: small, because anonymous traffic is keyed by
# client address, which a client can churn; the hot subjects are back at once.
cdef Py_ssize_t MAX_SUBJECT_KEYS = 4096


cdef class _Plan:
    """A Metering compiled to C fields."""

    cdef object m
    cdef object route
    cdef object plan
    cdef dict keys  # subject -> _Keys
    cdef bint empty
    cdef list quotas
    cdef bint has_bw
    cdef str bw_prefix
    cdef double bw_window
    cdef object bw_window_obj
    cdef double bw_limit
    cdef bint bw_enforce
    cdef str bw_note
    cdef list concurrency
    cdef tuple enforced
    cdef list rates
    cdef list bursts
    cdef bint subject_bucket
    cdef str subject_prefix
    cdef list bucket_heads
    cdef bint shadowed
    cdef object policy_header
    cdef object cost  # the route's (routes are frozen)
    cdef long long cost_c

    def __init__(self, m, plan):
        self.m = m
        self.route = m.route
        self.cost = m.route.cost
        self.cost_c = m.route.cost
        self.plan = plan
        self.keys = {}
        self.empty = m.empty
        self.quotas = [_Quota(q) for q in m.quotas]
        bw = m.bandwidth
        self.has_bw = bw is not None
        if bw is not None:
            self.bw_prefix = bw.prefix
            self.bw_window = bw.window
            self.bw_window_obj = bw.window
            self.bw_limit = bw.limit
            self.bw_enforce = bw.mode == "enforce"
            self.bw_note = f"bandwidth_exceeded:{bw.name}"
        self.concurrency = [_Concurrent(key, limit, mode) for key, limit, mode in m.concurrency]
        self.enforced = m.enforced
        self.rates = m.enforced_rates
        self.bursts = m.enforced_bursts
        self.subject_bucket = m.subject_bucket
        self.subject_prefix = m.enforced[0].prefix if m.subject_bucket else ""
        self.bucket_heads = [_head(b.name) for b in m.enforced]
        self.shadowed = bool(m.shadowed)
        self.policy_header = m.policy_header


cdef _Keys _keys_of(_Plan p, str subject):
    cdef PyObject *found = PyDict_GetItem(p.keys, subject)
    if found != NULL:
        return <_Keys>found
    cdef _Keys k = _Keys()
    cdef _Quota q
    k.quota = [q.prefix + subject for q in p.quotas]
    k.bw = p.bw_prefix + subject if p.has_bw else ""
    k.inflight = "subject:" + subject
    k.bucket = [p.subject_prefix + subject] if p.subject_bucket else None
    cdef _Concurrent c
    k.slots = tuple([c.key if c.key else k.inflight for c in p.concurrency])
    k.bandwidth = (k.bw, p.bw_window_obj) if p.has_bw else None
    if len(p.keys) >= MAX_SUBJECT_KEYS:
        p.keys.clear()
    p.keys[subject] = k
    return k


cdef class _MeterParts:
    """A Meter's parts, read once: they are set in ``Meter.__init__`` and never
    replaced (its counters' tables are, so those are read on every use)."""

    cdef object meter
    cdef object clock
    cdef bint realtime  # clock is time.time: read natively (_time_time)
    cdef object quota_counts
    cdef object bandwidth
    cdef dict inflight
    cdef object acquire  # buckets.acquire, bound once


cdef _MeterParts _parts = None


cdef inline double _now(_MeterParts parts) except? -1.0:
    if parts.realtime:
        return _time_time()
    return parts.clock()


cdef inline _MeterParts _parts_of(object meter):
    global _parts
    if _parts is not None and _parts.meter is meter:
        return _parts
    cdef _MeterParts parts = _MeterParts()
    parts.meter = meter
    parts.clock = meter.clock
    parts.realtime = parts.clock is time.time
    parts.quota_counts = meter.quota_counts
    parts.bandwidth = meter.bandwidth
    parts.inflight = meter.inflight
    parts.acquire = meter.buckets.acquire
    _parts = parts
    return parts


# route id -> {plan name or None -> _Plan}: looked up with strings whose hashes
# are cached, and no tuple per request.
cdef dict _plans = {}
cdef Py_ssize_t _compiled = 0


cdef _Plan _plan_of(object route, object plan):
    global _compiled
    name = plan.name if plan is not None else None
    cdef PyObject *by_plan = PyDict_GetItem(_plans, route.id)
    cdef PyObject *found = NULL
    if by_plan != NULL:
        found = PyDict_GetItem(<dict>by_plan, name)
        if found != NULL and (<_Plan>found).route is route and (<_Plan>found).plan is plan:
            return <_Plan>found
    compiled = _Plan(metering(route, plan), plan)
    if _compiled > 10_000:
        _plans.clear()  # reloads leave old routes behind; start over
        _compiled = 0
        by_plan = NULL
    if by_plan == NULL:
        _plans[route.id] = {}
    _plans[route.id][name] = compiled
    _compiled += 1
    return compiled


# The last request's (route, plan name, policy) and its _Plan: consecutive
# requests mostly share them. The policy is held, not just compared: a reload
# makes a new one, so a stale route or plan can never match.
cdef object _last_route = None
cdef object _last_plan_name = None
cdef object _last_policy = None
cdef _Plan _last_plan = None
cdef object _last_jitter = None  # its retry_jitter


cdef _Plan _remember(object route, object plan_name, object policy):
    global _last_route, _last_plan_name, _last_policy, _last_plan, _last_jitter
    plan = policy.plans.get(plan_name) if plan_name else None
    cdef _Plan p = _plan_of(route, plan)
    _last_route = route
    _last_plan_name = plan_name
    _last_policy = policy
    _last_plan = p
    _last_jitter = policy.retry_jitter
    return p


def fair_usage(req, policy, meter):
    """``gateway._usage_py.fair_usage``, natively."""
    route = req.route
    identity = req.identity
    assert route is not None
    plan_name = identity.plan if identity is not None else None
    cdef _Plan p
    if (
        route is _last_route
        and policy is _last_policy
        and (plan_name is _last_plan_name or plan_name == _last_plan_name)
    ):
        p = _last_plan  # the same route and plan as the last request: no lookups
    else:
        p = _remember(route, plan_name, policy)
    # Read at once, with no Python code since the branch above: another thread
    # could otherwise have remembered another policy's in between.
    jitter = _last_jitter
    if p.empty:
        return None
    cdef _MeterParts parts = _parts_of(meter)
    cost_obj = p.cost
    cdef long long cost = p.cost_c
    cdef double cost_f = <double>cost
    cdef str subject = identity.key if identity is not None else subject_of(req)
    cdef _Keys k = _keys_of(p, subject)
    cdef double now = _now(parts)
    # The tightest limit so far: remaining, its RateLimit head, reset.
    cdef bint tight = False
    cdef long long tight_left = 0
    cdef bytes tight_head = None
    cdef double tight_reset = 0.0
    cdef list quota_slots = None
    cdef _Quota q
    cdef _Concurrent c
    cdef array slot
    cdef double *s
    cdef double used
    cdef long long left, held
    cdef str key
    cdef tuple slots = k.slots
    cdef tuple verdict
    cdef PyObject *count
    cdef Py_ssize_t i, n

    # 1. Test quotas, bandwidth and concurrency: nothing is charged yet.
    if p.quotas:
        counts = parts.quota_counts
        quota_slots = []
        n = len(p.quotas)
        for i in range(n):
            q = p.quotas[i]
            slot = _slot(counts, k.quota[i], q.window, q.window_obj, now)
            quota_slots.append(slot)
            s = slot.data.as_doubles
            used = _weighted(s, now)
            if used + cost_f <= q.limit:
                if q.enforce:
                    left = <long long>(q.limit - used) - cost
                    if left < 0:
                        left = 0
                    if not tight or left < tight_left:
                        tight = True
                        tight_left = left
                        tight_head = q.head
                        tight_reset = _until_rollover(s, now)
            elif q.enforce:
                return refuse_quota(p.m, q.rule, slot, now, jitter)
            else:
                req.shadow.append(q.note)
    cdef str bw_key = ""
    if p.has_bw:
        bw_key = k.bw
        slot = _slot(parts.bandwidth, bw_key, p.bw_window, p.bw_window_obj, now)
        if _weighted(slot.data.as_doubles, now) >= p.bw_limit:
            if p.bw_enforce:
                return refuse_bandwidth(p.m, meter, bw_key, jitter)
            req.shadow.append(p.bw_note)
    cdef dict inflight = parts.inflight
    if p.concurrency:
        n = len(slots)
        for i in range(n):
            c = p.concurrency[i]
            key = slots[i]
            count = PyDict_GetItem(inflight, key)
            held = PyLong_AsLongLong(<object>count) if count != NULL else 0
            if held >= c.limit:
                if c.enforce:
                    return refuse_concurrency(p.m, key, c.limit_obj, jitter)
                req.shadow.append(c.note if c.key else "concurrency_limited:" + key)

    # 2. Buckets, all or nothing.
    if p.enforced:
        if p.subject_bucket:
            keys = k.bucket
        else:
            keys = bucket_keys(req, p.enforced)
        # A Verdict: a named tuple, read as the tuple it is.
        verdict = <tuple>parts.acquire(keys, p.rates, p.bursts, cost_obj)
        i = verdict[4]
        if not verdict[0]:
            return refuse_rate(p.m, p.enforced[i], verdict[3], verdict[2], jitter)
        left = verdict[1]
        if not tight or left <= tight_left:
            tight = True
            tight_left = left
            tight_head = p.bucket_heads[i]
            tight_reset = verdict[2]
    if p.shadowed:
        shadow_buckets(req, p.m, meter, cost_obj)

    # 3. Everything passed: charge quotas (shadow ones too, or they could
    # never report an overrun), take in-flight slots.
    if cost and quota_slots is not None:
        for slot in quota_slots:
            slot.data.as_doubles[2] += cost_f
    if slots:
        n = len(slots)
        for i in range(n):
            key = slots[i]
            count = PyDict_GetItem(inflight, key)
            held = PyLong_AsLongLong(<object>count) if count != NULL else 0
            PyDict_SetItem(inflight, key, held + 1)
        req.inflight = slots
    if p.has_bw:
        req.bandwidth = k.bandwidth
    if p.policy_header is not None or tight:
        headers = req.response_headers
        if p.policy_header is not None:
            PyList_Append(headers, p.policy_header)
        if tight:
            PyList_Append(headers, (b"ratelimit", _ratelimit(tight_head, tight_left, tight_reset)))
    return None


cdef long long _CHARGE_EVERY = CHARGE_EVERY


def charge(meter, req):
    """``gateway._usage_py.charge``, natively."""
    bandwidth = req.bandwidth
    assert bandwidth is not None
    moved_obj = req.bytes_in + req.bytes_out
    cdef long long moved = moved_obj
    cdef long long charged = req.charged
    key, window_obj = bandwidth
    cdef _MeterParts parts = _parts_of(meter)
    counter = parts.bandwidth
    # The counter's clock is the meter's (Meter.__init__).
    cdef double now = _now(parts)
    cdef array slot = _slot(counter, key, window_obj, window_obj, now)
    # SlidingCounter.add: slot[2] += amount (a float plus an int, as in Python)
    slot.data.as_doubles[2] += <double>(moved - charged)
    req.charged = moved_obj
    req.charge_at = moved + _CHARGE_EVERY


def leave(meter, tuple keys):
    """``Meter.leave``, natively: give back the in-flight slots ``fair_usage`` took."""
    cdef dict inflight = _parts_of(meter).inflight
    cdef PyObject *count
    cdef long long left
    for key in keys:
        count = PyDict_GetItem(inflight, key)
        left = (PyLong_AsLongLong(<object>count) if count != NULL else 1) - 1
        if left > 0:
            PyDict_SetItem(inflight, key, left)
        elif count != NULL:
            PyDict_DelItem(inflight, key)


def _wall_clock():
    """``_time_time()``, for the tests that hold it to ``time.time()``."""
    return _time_time()
