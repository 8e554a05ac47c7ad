/* l3ptp.worker._fastpath: the worker's per-packet hot spots in C. Optional.
 *
 * Each function here has a pure-Python reference that stays the definition of what it does, and the worker
 * uses that reference whenever this module is missing (a build without a C compiler) or disabled
 * (L3PTP_NATIVE=0): worker/native.py chooses. tests/fuzz/test_fuzz_native.py feeds both the same random and
 * crafted input and requires the same answer, byte for byte.
 *
 *   ones_sum(buffer)            = vnet.ones_sum: the folded 16-bit one's complement sum (RFC 1071)
 *   gro_parse(packet, local)    = gro._parse's fast path: the tuple, None, or False where gro._parse hands the
 *                                 packet to gro._parse_any (anything that is not a plain mergeable segment)
 *   tun_frame(packet, limit, v4, v6, context, sequence)
 *                               = ippacket.check_ip_untrusted(FROM_TUN) and header.encode_datagram, for
 *                                 Datapath.from_tun_batch: the DATAGRAM payload, or the index of the drop reason
 *   peer_packet(payload, context, previous, mtu, v4, v6)
 *                               = header.parse_header_untrusted, the context check and check_ip_untrusted
 *                                 (FROM_PEER), for Datapath.from_peer: (packet, sequence) or the reason's index
 *   tun_read(fd, size, reads, vnet)
 *                               = the read loop of tun_io.TunIO.read_batch: up to `reads` reads of `size`
 *                                 bytes; returns (packets, raw, status)
 *
 * Everything read here is outside input (a peer's packet, a local process's packet on the TUN). Every offset
 * is checked against the buffer's length before it is read; nothing is written outside memory this module
 * allocated; no length from a packet sizes an allocation. No state is kept between calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define PROTO_TCP 6
#define TCP_ACK 0x10
#define TCP_PSH 0x08
#define VNET_HDR_LEN 10

/* The sum of `len` bytes as big-endian 16-bit words (an odd last byte as the high byte of a word), not folded. */
static uint64_t
word_sum(const unsigned char *p, Py_ssize_t len)
{
    uint64_t s = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= len; i += 8)
        s += ((uint32_t)p[i] << 8 | p[i + 1]) + ((uint32_t)p[i + 2] << 8 | p[i + 3])
             + ((uint32_t)p[i + 4] << 8 | p[i + 5]) + ((uint32_t)p[i + 6] << 8 | p[i + 7]);
    for (; i + 2 <= len; i += 2)
        s += (uint32_t)p[i] << 8 | p[i + 1];
    if (i < len)
        s += (uint32_t)p[i] << 8;
    return s;
}

static inline unsigned
be16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static inline unsigned long
be32(const unsigned char *p)
{
    return (unsigned long)p[0] << 24 | (unsigned long)p[1] << 16 | (unsigned long)p[2] << 8 | p[3];
}

/* vnet.ones_sum: n mod 0xFFFF, where n is the buffer as one big-endian number (padded to whole words); 0xFFFF
 * instead of 0 unless every byte is 0. The word sum is congruent to n modulo 0xFFFF (65536 = 1 mod 65535). */
static PyObject *
fp_ones_sum(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t s = word_sum(view.buf, view.len);
    PyBuffer_Release(&view);
    unsigned long r = (unsigned long)(s % 0xFFFF);
    if (r == 0 && s != 0)
        r = 0xFFFF;
    return PyLong_FromUnsignedLong(r);
}

static PyObject *
concat3(const unsigned char *a, Py_ssize_t alen, const unsigned char *b, Py_ssize_t blen,
        const unsigned char *c, Py_ssize_t clen, const unsigned char *d, Py_ssize_t dlen)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, alen + blen + clen + dlen);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    memcpy(o, a, alen);
    memcpy(o + alen, b, blen);
    memcpy(o + alen + blen, c, clen);
    memcpy(o + alen + blen + clen, d, dlen);
    return out;
}

/* gro._parse, its fast path: the same tuple or None, and False wherever gro._parse calls gro._parse_any. */
static PyObject *
fp_gro_parse(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "gro_parse(packet, local)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t size = view.len;
    PyObject *result = NULL;

    if (size < 60)
        goto slow;
    unsigned first = p[0];
    if (p[(first >> 4) == 4 ? 9 : 6] != PROTO_TCP) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t iphl, tcphl, pseudo_from, dst_at, dst_len, flow_at, flow_len;
    unsigned flags, ident, version;
    unsigned char ip_match[5];
    Py_ssize_t ip_match_len;
    if (first == 0x45) {
        unsigned total = be16(p + 2), frag = be16(p + 6);
        ident = be16(p + 4);
        tcphl = (p[32] >> 4) * 4;
        flags = p[33];
        if ((frag & 0x3FFF) || (Py_ssize_t)total != size || tcphl < 20 || size <= 20 + tcphl
            || (flags & ~(TCP_ACK | TCP_PSH)) || !(flags & TCP_ACK) || word_sum(p, 20) % 0xFFFF)
            goto slow;
        iphl = 20, version = 4, pseudo_from = 12, dst_at = 16, dst_len = 4, flow_at = 12, flow_len = 12;
        ip_match[0] = p[1], ip_match[1] = p[8], ip_match[2] = (frag >> 8) & 0x40, ip_match_len = 3;
    }
    else if ((first >> 4) == 6) {
        unsigned plen = be16(p + 4);
        tcphl = (p[52] >> 4) * 4;
        flags = p[53];
        if ((Py_ssize_t)plen + 40 != size || tcphl < 20 || size <= 40 + tcphl
            || (flags & ~(TCP_ACK | TCP_PSH)) || !(flags & TCP_ACK))
            goto slow;
        iphl = 40, version = 6, ident = 0, pseudo_from = 8, dst_at = 24, dst_len = 16, flow_at = 8, flow_len = 36;
        memcpy(ip_match, p, 4), ip_match[4] = p[7], ip_match_len = 5;
    }
    else
        goto slow;
    /* size > iphl + tcphl >= iphl + 20: every offset read below is inside the packet. */
    Py_ssize_t end = iphl + tcphl;
    PyObject *dst = PyBytes_FromStringAndSize((const char *)p + dst_at, dst_len);
    if (dst == NULL)
        goto done;
    int is_local = PySequence_Contains(args[1], dst);
    Py_DECREF(dst);
    if (is_local < 0)
        goto done;
    PyObject *claimed;
    uint64_t length = (uint64_t)(size - iphl);
    if (is_local) {
        unsigned long r = (unsigned long)((word_sum(p + pseudo_from, end - pseudo_from) + PROTO_TCP + length)
                                          % 0xFFFF);
        claimed = PyLong_FromUnsignedLong(0xFFFF - (r ? r : 0xFFFF));
        if (claimed == NULL)
            goto done;
    }
    else {
        if ((word_sum(p + pseudo_from, size - pseudo_from) + PROTO_TCP + length) % 0xFFFF)
            goto slow;
        claimed = Py_NewRef(Py_None);
    }
    const unsigned char *tcp = p + iphl;
    PyObject *flow = PyBytes_FromStringAndSize((const char *)p + flow_at, flow_len);
    PyObject *match = concat3(ip_match, ip_match_len, tcp + 8, 5, tcp + 14, 2, tcp + 20, tcphl - 20);
    if (flow == NULL || match == NULL) {
        Py_XDECREF(flow);
        Py_XDECREF(match);
        Py_DECREF(claimed);
        goto done;
    }
    /* (flow, match, version, iphl, tcphl, payload, seq, ident, psh, claimed) */
    result = Py_BuildValue("(NNnnnnkIOO)", flow, match, (Py_ssize_t)version, iphl, tcphl, size - end,
                           be32(tcp + 4), ident, (flags & TCP_PSH) ? Py_True : Py_False, claimed);
    Py_DECREF(claimed);
    goto done;
slow:
    result = Py_NewRef(Py_False);
done:
    PyBuffer_Release(&view);
    return result;
}

/* The read loop of TunIO.read_batch: at most `reads` reads of at most `size` bytes from `fd` (non-blocking).
 * Returns (packets, raw, status):
 *   packets  the packets read, in order (with `vnet`, each read's plain virtio_net_hdr taken off);
 *   raw      None, or (with `vnet`) the whole last read, header included, when its header is not all-plain
 *            (flags or gso_type set) or it is no longer than a header: the caller splits or refuses it (vnet.split)
 *            and calls again for the rest;
 *   status   0: stopped at EAGAIN or after `reads` reads; -1: end of file; else the errno of a failed read.
 * EINTR ends the batch like EAGAIN (the caller's loop comes back). */
static PyObject *
fp_tun_read(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, vnet;
    Py_ssize_t size, reads;
    if (!PyArg_ParseTuple(args, "innp", &fd, &size, &reads, &vnet))
        return NULL;
    if (size <= VNET_HDR_LEN || size > (1 << 20) || reads < 0) {
        PyErr_SetString(PyExc_ValueError, "tun_read: size must be 11..1048576 and reads >= 0");
        return NULL;
    }
    PyObject *packets = PyList_New(0);
    if (packets == NULL)
        return NULL;
    unsigned char *buf = PyMem_RawMalloc((size_t)size);
    if (buf == NULL) {
        Py_DECREF(packets);
        return PyErr_NoMemory();
    }
    PyObject *raw = NULL;
    long status = 0;
    for (Py_ssize_t i = 0; i < reads; i++) {
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = read(fd, buf, (size_t)size);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR)
                status = err;
            break;
        }
        if (n == 0) {
            status = -1;
            break;
        }
        PyObject *packet;
        if (!vnet)
            packet = PyBytes_FromStringAndSize((const char *)buf, n);
        else if (n > VNET_HDR_LEN && buf[0] == 0 && buf[1] == 0)
            packet = PyBytes_FromStringAndSize((const char *)buf + VNET_HDR_LEN, n - VNET_HDR_LEN);
        else {
            raw = PyBytes_FromStringAndSize((const char *)buf, n);
            if (raw == NULL)
                goto fail;
            break;
        }
        if (packet == NULL)
            goto fail;
        int appended = PyList_Append(packets, packet);
        Py_DECREF(packet);
        if (appended < 0)
            goto fail;
    }
    PyMem_RawFree(buf);
    return Py_BuildValue("(NNl)", packets, raw ? raw : Py_NewRef(Py_None), status);
fail:
    PyMem_RawFree(buf);
    Py_DECREF(packets);
    Py_XDECREF(raw);
    return NULL;
}

/* PrefixSet's lookup (ippacket.py): is `source & mask` in `networks` for one (mask, networks) of `groups`?
 * 1 yes, 0 no, -1 error. `groups` is a PrefixSet's `_v4` or `_v6`: a tuple of (int, frozenset of int). */
static int
src_allowed(PyObject *groups, PyObject *source)
{
    if (!PyTuple_Check(groups)) {
        PyErr_SetString(PyExc_TypeError, "prefix groups must be a tuple");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(groups); i++) {
        PyObject *group = PyTuple_GET_ITEM(groups, i);
        if (!PyTuple_Check(group) || PyTuple_GET_SIZE(group) != 2) {
            PyErr_SetString(PyExc_TypeError, "a prefix group must be (mask, networks)");
            return -1;
        }
        PyObject *masked = PyNumber_And(source, PyTuple_GET_ITEM(group, 0));
        if (masked == NULL)
            return -1;
        int found = PySequence_Contains(PyTuple_GET_ITEM(group, 1), masked);
        Py_DECREF(masked);
        if (found)
            return found;
    }
    return 0;
}

/* ippacket.check_ip_untrusted, as an index into its reasons: IP_OK (forward), or 0 bad packet, 1 bad IP version,
 * 2 oversize, 3 source not allowed, in the same order of checks; IP_ERROR with an exception set. */
#define IP_OK (-1)
#define IP_ERROR (-2)
static int
ip_check(const unsigned char *p, Py_ssize_t size, Py_ssize_t mtu, PyObject *v4, PyObject *v6)
{
    if (size <= 0)
        return 0;
    unsigned version = p[0] >> 4;
    PyObject *source, *groups;
    if (version == 4) {
        if (size > mtu)
            return 2;
        if (size < 20)
            return 0;
        Py_ssize_t ihl = p[0] & 0x0F;
        if (ihl < 5 || ihl * 4 > size || (Py_ssize_t)be16(p + 2) != size)
            return 0;
        source = PyLong_FromUnsignedLong(be32(p + 12));
        groups = v4;
    }
    else if (version == 6) {
        if (size > mtu)
            return 2;
        if (size < 40)
            return 0;
        Py_ssize_t plen = be16(p + 4);
        if (!plen || plen + 40 != size)
            return 0;
        unsigned long long high = 0, low = 0;
        for (int i = 0; i < 8; i++)
            high = high << 8 | p[8 + i], low = low << 8 | p[16 + i];
        PyObject *h = PyLong_FromUnsignedLongLong(high), *l = PyLong_FromUnsignedLongLong(low);
        PyObject *sixty_four = PyLong_FromLong(64);
        PyObject *shifted = (h && sixty_four) ? PyNumber_Lshift(h, sixty_four) : NULL;
        source = (shifted && l) ? PyNumber_Or(shifted, l) : NULL;
        Py_XDECREF(h), Py_XDECREF(l), Py_XDECREF(sixty_four), Py_XDECREF(shifted);
        groups = v6;
    }
    else
        return 1;
    if (source == NULL)
        return IP_ERROR;
    int allowed = src_allowed(groups, source);
    Py_DECREF(source);
    return allowed < 0 ? IP_ERROR : allowed ? IP_OK : 3;
}

#define HEADER_LEN 16
#define HEADER_TYPE_IP 0x03
#define HEADER_VERSION 0x01

/* Datapath.from_tun_batch, one packet: check_ip_untrusted(FROM_TUN, mtu=limit) and, if it passes,
 * header.encode_datagram(context, sequence, packet). Returns the DATAGRAM payload (bytes), or the reason's index
 * (int, as ip_check). */
static PyObject *
fp_tun_frame(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "tun_frame(packet, limit, v4, v6, context, sequence)");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    unsigned long context = PyLong_AsUnsignedLongMask(args[4]), sequence = PyLong_AsUnsignedLongMask(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    PyObject *result;
    int code = ip_check(p, view.len, limit, args[2], args[3]);
    if (code == IP_ERROR)
        result = NULL;
    else if (code != IP_OK)
        result = PyLong_FromLong(code);
    else if (view.len > 0xFFFF) {  /* cannot pass ip_check (16-bit lengths); checked, not assumed */
        result = PyLong_FromLong(0);
    }
    else {
        result = PyBytes_FromStringAndSize(NULL, HEADER_LEN + view.len);
        if (result != NULL) {
            unsigned char *o = (unsigned char *)PyBytes_AS_STRING(result);
            o[0] = HEADER_TYPE_IP, o[1] = HEADER_VERSION, o[2] = 0, o[3] = HEADER_LEN;
            o[4] = context >> 24 & 0xFF, o[5] = context >> 16 & 0xFF, o[6] = context >> 8 & 0xFF, o[7] = context & 0xFF;
            sequence &= 0xFFFFFFFFUL;
            o[8] = sequence >> 24, o[9] = sequence >> 16 & 0xFF, o[10] = sequence >> 8 & 0xFF, o[11] = sequence & 0xFF;
            o[12] = 0, o[13] = p[0] >> 4, o[14] = view.len >> 8, o[15] = view.len & 0xFF;
            memcpy(o + HEADER_LEN, p, view.len);
        }
    }
    PyBuffer_Release(&view);
    return result;
}

/* Datapath.from_peer's checks: header.parse_header_untrusted, the context (ours or the retiring one's) and
 * check_ip_untrusted(FROM_PEER, mtu). Returns (packet, sequence), `packet` a memoryview of `payload` past its
 * header (no copy), or an int: 0 bad header, 1 bad IP version (header), 2 unknown context, and 3 + ip_check's
 * index (3 bad IP, 4 bad IP version, 5 oversize, 6 source not allowed). */
static PyObject *
fp_peer_packet(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "peer_packet(payload, context, previous, mtu, v4, v6)");
        return NULL;
    }
    long long context = PyLong_AsLongLong(args[1]), previous = PyLong_AsLongLong(args[2]);
    Py_ssize_t mtu = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t size = view.len;
    PyObject *result = NULL;
    int code = -1;
    if (size < HEADER_LEN || p[0] != HEADER_TYPE_IP || p[1] != HEADER_VERSION)
        code = 0;
    else {
        Py_ssize_t header_len = be16(p + 2), payload_len = be16(p + 14);
        unsigned ip_version = p[13];
        long long got = (long long)be32(p + 4);
        if (header_len < HEADER_LEN || header_len > size || payload_len != size - header_len)
            code = 0;
        else if ((ip_version != 4 && ip_version != 6) || !payload_len || p[header_len] >> 4 != ip_version)
            code = 1;
        else if (got != context && got != previous)
            code = 2;
        else {
            int ip = ip_check(p + header_len, payload_len, mtu, args[4], args[5]);
            if (ip == IP_ERROR)
                goto done;
            if (ip != IP_OK)
                code = 3 + ip;
            else {
                PyObject *whole = PyMemoryView_FromObject(args[0]);
                if (whole == NULL)
                    goto done;
                PyObject *packet = PySequence_GetSlice(whole, header_len, size);
                Py_DECREF(whole);
                if (packet == NULL)
                    goto done;
                result = Py_BuildValue("(Nk)", packet, be32(p + 8));
                goto done;
            }
        }
    }
    result = PyLong_FromLong(code);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"ones_sum", fp_ones_sum, METH_O, "vnet.ones_sum in C."},
    {"gro_parse", (PyCFunction)(void (*)(void))fp_gro_parse, METH_FASTCALL, "gro._parse's fast path in C."},
    {"tun_read", fp_tun_read, METH_VARARGS, "TunIO.read_batch's read loop in C."},
    {"tun_frame", (PyCFunction)(void (*)(void))fp_tun_frame, METH_FASTCALL, "A packet read from the TUN: checked, framed."},
    {"peer_packet", (PyCFunction)(void (*)(void))fp_peer_packet, METH_FASTCALL, "A DATAGRAM payload: checked, its packet."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "l3ptp.worker._fastpath", "The worker's per-packet hot spots in C (worker/native.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    return PyModule_Create(&module_def);
}
