# Shared by the native modules (``include "_gather.pxi"``): a finished
# request's audit facts, read straight from its slots.
#
# The request and the objects it holds are slotted dataclasses. A generic
# attribute read costs ~130 instructions (type lookup, descriptor, member
# get): more than the interpreter's, which caches each slot's offset. So this
# does what the interpreter does: it finds each slot's offset once
# (``_gather_ready``) and reads the slot directly, for objects of exactly
# those classes. Anything else (a subclass, an unset slot) is left to the
# twin (``gateway._facts_py.snapshot``), which reads attributes the ordinary
# way and raises what Python raises.
#
# ``_gather`` fills an array of the 25 facts, in ``snapshot``'s order, with
# references of the caller's own (``_release`` drops them): ``_facts_c``
# makes the snapshot's tuple of them, ``_records_c`` writes a record's body
# from them with no tuple at all. The latency and the timestamp, when they
# are the clocks' doubles, come as doubles (their slots left NULL): no float
# object is made for a record body.

from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF

import types

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
cdef enum:
    FACTS = 25
    F_LATENCY = 6
    F_TS = 22


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


# Each slot read, by class; filled in by _gather_ready().
cdef Py_ssize_t R_IDENTITY, R_ROUTE, R_REFUSAL, R_CLIENT, R_SHADOW, R_SIGNALS, R_ABORTED
cdef Py_ssize_t R_STARTED, R_PATH, R_RAW_PATH, R_BYTES_IN, R_BYTES_OUT, R_METHOD
cdef Py_ssize_t R_REQUEST_ID, R_STATUS, R_UPSTREAM_STATUS
cdef Py_ssize_t I_PLAN, I_ROLES, I_SESSION, I_SUBJECT, I_TENANT
cdef Py_ssize_t C_NETWORK, C_IP, T_ID, T_UPSTREAM, D_REASON, D_RULE, P_REVISION
cdef Py_ssize_t _R_ALL[16]
cdef type _RequestContext = None
cdef type _Identity, _ClientAddress, _Decision, _Policy, _Route
cdef object _twin_snapshot


cdef int _gather_ready() except -1:
    """Find the slots' offsets (once: the classes are imported here, so a
    module that never gathers, such as the audit writer process's, never
    imports the gateway's request classes)."""
    global R_IDENTITY, R_ROUTE, R_REFUSAL, R_CLIENT, R_SHADOW, R_SIGNALS, R_ABORTED
    global R_STARTED, R_PATH, R_RAW_PATH, R_BYTES_IN, R_BYTES_OUT, R_METHOD
    global R_REQUEST_ID, R_STATUS, R_UPSTREAM_STATUS
    global I_PLAN, I_ROLES, I_SESSION, I_SUBJECT, I_TENANT
    global C_NETWORK, C_IP, T_ID, T_UPSTREAM, D_REASON, D_RULE, P_REVISION
    global _RequestContext, _Identity, _ClientAddress, _Decision, _Policy, _Route
    global _twin_snapshot
    if _RequestContext is not None:
        return 0
    from gateway import _facts_py

    # The twin first: should an offset not be found (a class changed), every
    # request goes to it (_gather returns 1 while _RequestContext is None).
    _twin_snapshot = _facts_py.snapshot
    from gateway.auth import Identity
    from gateway.clientaddr import ClientAddress
    from gateway.context import RequestContext
    from gateway.decision import Decision
    from gateway.policy.model import Policy, Route

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
    _R_ALL[:] = [R_IDENTITY, R_ROUTE, R_REFUSAL, R_CLIENT, R_SHADOW, R_SIGNALS, R_ABORTED,
                 R_STARTED, R_PATH, R_RAW_PATH, R_BYTES_IN, R_BYTES_OUT, R_METHOD,
                 R_REQUEST_ID, R_STATUS, R_UPSTREAM_STATUS]
    _Identity, _ClientAddress, _Decision = Identity, ClientAddress, Decision
    _Policy, _Route = Policy, Route
    _RequestContext = RequestContext
    return 0


cdef inline bint _all_set(object obj, const Py_ssize_t *offsets, int n) noexcept:
    cdef int i
    for i in range(n):
        if _slot(obj, offsets[i]) == NULL:
            return False
    return True


cdef inline void _put(PyObject **it, int k, object value) noexcept:
    Py_INCREF(value)
    it[k] = <PyObject *>value


cdef inline void _release(PyObject **it) noexcept:
    cdef int k
    for k in range(FACTS):
        Py_XDECREF(it[k])
        it[k] = NULL


cdef int _gather(
    object req, object policy, object degraded, object now, object finished,
    PyObject **it, double *latency, double *ts, bint for_body,
) except -1:
    """The facts of ``req`` into ``it`` (``FACTS`` references of the caller's
    own, ``it[F_LATENCY]`` and ``it[F_TS]`` NULL when ``*latency`` and ``*ts``
    hold them) and 0; or 1, ``it`` untouched, when the twin must take the
    request (``_gather_ready`` must have run)."""
    cdef Py_ssize_t i5[5]
    cdef Py_ssize_t two[2]
    cdef PyObject *started
    if type(req) is not _RequestContext or type(policy) is not _Policy:
        return 1
    if not _all_set(req, _R_ALL, 16) or _slot(policy, P_REVISION) == NULL:
        return 1
    cdef PyObject *identity = _slot(req, R_IDENTITY)
    cdef PyObject *route = _slot(req, R_ROUTE)
    cdef PyObject *refusal = _slot(req, R_REFUSAL)
    cdef PyObject *client = _slot(req, R_CLIENT)
    cdef PyObject *none = <PyObject *>None
    # Every object read below must be of its exact class, its slots set.
    if identity != none:
        i5[:] = [I_PLAN, I_ROLES, I_SESSION, I_SUBJECT, I_TENANT]
        if type(<object>identity) is not _Identity or not _all_set(<object>identity, i5, 5):
            return 1
    if route != none:
        two[:] = [T_ID, T_UPSTREAM]
        if type(<object>route) is not _Route or not _all_set(<object>route, two, 2):
            return 1
    if refusal != none:
        two[:] = [D_REASON, D_RULE]
        if type(<object>refusal) is not _Decision or not _all_set(<object>refusal, two, 2):
            return 1
    if client != none:
        two[:] = [C_NETWORK, C_IP]
        if type(<object>client) is not _ClientAddress or not _all_set(<object>client, two, 2):
            return 1

    # Every slot the facts hold is taken (a reference of ours) before any
    # code that could run Python (and so, in theory, change a slot) runs.
    cdef int k
    for k in range(FACTS):
        it[k] = NULL
    _put(it, 0, <object>_slot(req, R_BYTES_IN))
    _put(it, 1, <object>_slot(req, R_BYTES_OUT))
    _put(it, 7, <object>_slot(req, R_METHOD))
    _put(it, 9, <object>_slot(req, R_PATH))
    _put(it, 11, <object>_slot(policy, P_REVISION))
    _put(it, 13, <object>_slot(req, R_REQUEST_ID))
    _put(it, 19, <object>_slot(req, R_STATUS))
    _put(it, 24, <object>_slot(req, R_UPSTREAM_STATUS))
    if client != none:
        _put(it, 2, <object>_slot(<object>client, C_NETWORK))
        _put(it, 3, <object>_slot(<object>client, C_IP))
    else:
        _put(it, 2, None)
        _put(it, 3, None)
    if identity != none:
        _put(it, 10, <object>_slot(<object>identity, I_PLAN))
        _put(it, 14, <object>_slot(<object>identity, I_ROLES))
        _put(it, 17, <object>_slot(<object>identity, I_SESSION))
        _put(it, 20, <object>_slot(<object>identity, I_SUBJECT))
        _put(it, 21, <object>_slot(<object>identity, I_TENANT))
    else:
        _put(it, 10, None)
        _put(it, 14, ())
        _put(it, 17, None)
        _put(it, 20, None)
        _put(it, 21, None)
    if route != none:
        _put(it, 15, <object>_slot(<object>route, T_ID))
        _put(it, 23, <object>_slot(<object>route, T_UPSTREAM))
    else:
        _put(it, 15, None)
        _put(it, 23, None)
    _put(it, 5, degraded)
    shadow = <object>_slot(req, R_SHADOW)
    signals_list = <object>_slot(req, R_SIGNALS)
    aborted = <object>_slot(req, R_ABORTED)
    started_obj = <object>_slot(req, R_STARTED)
    raw_path = <object>_slot(req, R_RAW_PATH)
    refusal_obj = <object>refusal  # a reference of ours too
    try:
        if refusal_obj is not None:
            _put(it, 4, "deny")
            _put(it, 8, "enforce")
            _put(it, 12, <object>_slot(refusal_obj, D_REASON))
            _put(it, 16, <object>_slot(refusal_obj, D_RULE))
        elif shadow:
            # The request passed; the record says what enforcement would have done.
            first_reason, _, rule = shadow[0].partition(":")
            _put(it, 4, "shadow_deny")
            _put(it, 8, "shadow")
            _put(it, 12, first_reason)
            _put(it, 16, rule)
        else:
            _put(it, 4, "allow")
            _put(it, 8, "enforce")
            _put(it, 12, None)
            _put(it, 16, None)
        if for_body and not shadow and not aborted and type(signals_list) is list:
            # A body writes the request's own list of signals as it is (the
            # same JSON array as the tuple the twin makes of it); only a body
            # writer may ask for this (the facts then hold a list, not a tuple).
            _put(it, 18, signals_list)
        else:
            signals = (*signals_list, *shadow)
            if aborted:
                signals += (aborted,)
            _put(it, 18, signals)
        if finished is None and type(started_obj) is float:
            latency[0] = _perf_counter() - PyFloat_AS_DOUBLE(started_obj)
        else:
            if finished is None:
                finished = PyFloat_FromDouble(_perf_counter())
            _put(it, F_LATENCY, finished - started_obj)
        path = <object>it[9]
        if not path:
            path = raw_path[:512].decode("latin-1").encode("unicode_escape").decode()
            Py_XDECREF(it[9])
            it[9] = NULL
            _put(it, 9, path)
        if now is None:
            ts[0] = _time_time()
        else:
            _put(it, F_TS, now)
    except BaseException:
        _release(it)
        raise
    return 0
