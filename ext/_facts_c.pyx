# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A finished request's audit facts, native implementation (``gateway._facts_c``).

Returns, value for value, the tuple that ``gateway/_facts_py.py`` returns,
with Python's own arithmetic on the times (only the clocks are read
natively, to the same double as ``time.time()`` and ``time.perf_counter()``).

The request and the objects it holds are slotted dataclasses. A generic
attribute read costs ~130 instructions (type lookup, descriptor, member
get): more than the interpreter's, which caches each slot's offset. So this
module does what the interpreter does: it finds each slot's offset once, at
import, and reads the slot directly, for objects of exactly those classes.
Anything else (a subclass, an unset slot) is left to the twin, which reads
attributes the ordinary way and raises what Python raises.
"""

from cpython.float cimport PyFloat_FromDouble
from cpython.object cimport PyObject

import types

from gateway import _facts_py
from gateway.auth import Identity
from gateway.clientaddr import ClientAddress
from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.policy.model import Policy, Route

__all__ = ["snapshot"]

include "_clock.pxi"


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef int _T_OBJECT_EX = 16  # structmember.h: a slot, AttributeError when unset


cdef Py_ssize_t _offset(type cls, str name) except -1:
    descr = cls.__dict__.get(name)
    if type(descr) is not types.MemberDescriptorType:
        raise ImportError(f"{cls.__name__}.{name} is not a slot")
    cdef PyMemberDef *member = (<PyMemberDescrObject *><PyObject *>descr).d_member
    if member.type != _T_OBJECT_EX:
        raise ImportError(f"{cls.__name__}.{name} is not an object slot")
    return member.offset


cdef inline PyObject *_slot(object obj, Py_ssize_t offset) noexcept:
    return (<PyObject **>((<char *><PyObject *>obj) + offset))[0]


# Each slot read, by class; filled in at import.
cdef Py_ssize_t R_IDENTITY, R_ROUTE, R_REFUSAL, R_CLIENT, R_SHADOW, R_SIGNALS, R_ABORTED
cdef Py_ssize_t R_STARTED, R_PATH, R_RAW_PATH, R_BYTES_IN, R_BYTES_OUT, R_METHOD
cdef Py_ssize_t R_REQUEST_ID, R_STATUS, R_UPSTREAM_STATUS
cdef Py_ssize_t I_PLAN, I_ROLES, I_SESSION, I_SUBJECT, I_TENANT
cdef Py_ssize_t C_NETWORK, C_IP, T_ID, T_UPSTREAM, D_REASON, D_RULE, P_REVISION

R_IDENTITY = _offset(RequestContext, "identity")
R_ROUTE = _offset(RequestContext, "route")
R_REFUSAL = _offset(RequestContext, "refusal")
R_CLIENT = _offset(RequestContext, "client")
R_SHADOW = _offset(RequestContext, "shadow")
R_SIGNALS = _offset(RequestContext, "signals")
R_ABORTED = _offset(RequestContext, "aborted")
R_STARTED = _offset(RequestContext, "started")
R_PATH = _offset(RequestContext, "path")
R_RAW_PATH = _offset(RequestContext, "raw_path")
R_BYTES_IN = _offset(RequestContext, "bytes_in")
R_BYTES_OUT = _offset(RequestContext, "bytes_out")
R_METHOD = _offset(RequestContext, "method")
R_REQUEST_ID = _offset(RequestContext, "request_id")
R_STATUS = _offset(RequestContext, "status")
R_UPSTREAM_STATUS = _offset(RequestContext, "upstream_status")
I_PLAN = _offset(Identity, "plan")
I_ROLES = _offset(Identity, "roles")
I_SESSION = _offset(Identity, "session")
I_SUBJECT = _offset(Identity, "subject")
I_TENANT = _offset(Identity, "tenant")
C_NETWORK = _offset(ClientAddress, "network")
C_IP = _offset(ClientAddress, "ip")
T_ID = _offset(Route, "id")
T_UPSTREAM = _offset(Route, "upstream")
D_REASON = _offset(Decision, "reason")
D_RULE = _offset(Decision, "rule")
P_REVISION = _offset(Policy, "revision")

cdef object _twin = _facts_py.snapshot


cdef inline bint _all_set(object obj, Py_ssize_t *offsets, int n) noexcept:
    cdef int i
    for i in range(n):
        if _slot(obj, offsets[i]) == NULL:
            return False
    return True


def snapshot(req, policy, *, degraded=False, now=None, finished=None):
    cdef Py_ssize_t r[16]
    cdef Py_ssize_t i5[5]
    cdef Py_ssize_t two[2]
    if type(req) is not RequestContext or type(policy) is not Policy:
        return _twin(req, policy, degraded=degraded, now=now, finished=finished)
    r[:] = [R_IDENTITY, R_ROUTE, R_REFUSAL, R_CLIENT, R_SHADOW, R_SIGNALS, R_ABORTED,
            R_STARTED, R_PATH, R_RAW_PATH, R_BYTES_IN, R_BYTES_OUT, R_METHOD,
            R_REQUEST_ID, R_STATUS, R_UPSTREAM_STATUS]
    if not _all_set(req, r, 16) or _slot(policy, P_REVISION) == NULL:
        return _twin(req, policy, degraded=degraded, now=now, finished=finished)
    identity = <object>_slot(req, R_IDENTITY)
    route = <object>_slot(req, R_ROUTE)
    refusal = <object>_slot(req, R_REFUSAL)
    client = <object>_slot(req, R_CLIENT)
    # Every object read below must be of its exact class, its slots set.
    if identity is not None:
        i5[:] = [I_PLAN, I_ROLES, I_SESSION, I_SUBJECT, I_TENANT]
        if type(identity) is not Identity or not _all_set(identity, i5, 5):
            return _twin(req, policy, degraded=degraded, now=now, finished=finished)
    if route is not None:
        two[:] = [T_ID, T_UPSTREAM]
        if type(route) is not Route or not _all_set(route, two, 2):
            return _twin(req, policy, degraded=degraded, now=now, finished=finished)
    if refusal is not None:
        two[:] = [D_REASON, D_RULE]
        if type(refusal) is not Decision or not _all_set(refusal, two, 2):
            return _twin(req, policy, degraded=degraded, now=now, finished=finished)
    if client is not None:
        two[:] = [C_NETWORK, C_IP]
        if type(client) is not ClientAddress or not _all_set(client, two, 2):
            return _twin(req, policy, degraded=degraded, now=now, finished=finished)

    # Every slot is read now, before any code that could run Python (and so,
    # in theory, delete a slot) runs: each is then a reference of our own.
    shadow = <object>_slot(req, R_SHADOW)
    signals_list = <object>_slot(req, R_SIGNALS)
    aborted = <object>_slot(req, R_ABORTED)
    started = <object>_slot(req, R_STARTED)
    path = <object>_slot(req, R_PATH)
    raw_path = <object>_slot(req, R_RAW_PATH)
    bytes_in = <object>_slot(req, R_BYTES_IN)
    bytes_out = <object>_slot(req, R_BYTES_OUT)
    method = <object>_slot(req, R_METHOD)
    request_id = <object>_slot(req, R_REQUEST_ID)
    status = <object>_slot(req, R_STATUS)
    upstream_status = <object>_slot(req, R_UPSTREAM_STATUS)
    revision = <object>_slot(policy, P_REVISION)
    reason = rule = None
    if refusal is not None:
        reason = <object>_slot(refusal, D_REASON)
        rule = <object>_slot(refusal, D_RULE)
    plan = session = subject = tenant = None
    roles = ()
    if identity is not None:
        plan = <object>_slot(identity, I_PLAN)
        roles = <object>_slot(identity, I_ROLES)
        session = <object>_slot(identity, I_SESSION)
        subject = <object>_slot(identity, I_SUBJECT)
        tenant = <object>_slot(identity, I_TENANT)
    network = ip = route_id = upstream = None
    if client is not None:
        network = <object>_slot(client, C_NETWORK)
        ip = <object>_slot(client, C_IP)
    if route is not None:
        route_id = <object>_slot(route, T_ID)
        upstream = <object>_slot(route, T_UPSTREAM)

    if refusal is not None:
        decision = "deny"
        mode = "enforce"
    elif shadow:
        # The request passed; the record says what enforcement would have done.
        first_reason, _, rule = shadow[0].partition(":")
        decision = "shadow_deny"
        reason = first_reason
        mode = "shadow"
    else:
        decision = "allow"
        mode = "enforce"
    signals = (*signals_list, *shadow)
    if aborted:
        signals += (aborted,)
    if finished is None:
        finished = PyFloat_FromDouble(_perf_counter())
    latency = finished - started
    if not path:
        path = raw_path[:512].decode("latin-1").encode("unicode_escape").decode()
    ts = PyFloat_FromDouble(_time_time()) if now is None else now
    return (
        bytes_in,
        bytes_out,
        network,
        ip,
        decision,
        degraded,
        latency,
        method,
        mode,
        path,
        plan,
        revision,
        reason,
        request_id,
        roles,
        route_id,
        rule,
        session,
        signals,
        status,
        subject,
        tenant,
        ts,
        upstream,
        upstream_status,
    )
