/* The relay's per-packet path for bound UDP clients, native (issue 18).
 *
 * One Core per data plane owns its public sockets and its internal socket for the hot path:
 *
 *   Core(internal_fd, public_fds, class_table, reasons, unbound_rate, unbound_burst,
 *        max_keys, lookups, gso=False)
 *   add(client_ip, client_port, media_ip, media_port, via, binding)  upsert one binding
 *   remove(client_ip, client_port)
 *   set_via(client_ip, client_port, via)
 *   pump_public(via) -> list[(data, (ip, port), kind)]   packets for the Python router
 *   pump_internal() -> list[(data, (ip, port))]          frames for the Python router
 *   take_activity() -> list[(binding, packets, bytes, via, seen)]  bindings with traffic
 *     since the last call (seen: a client packet among it, which refreshes last_seen)
 *   take_counters() -> 6 matrices [direction][class|reason], deltas since the last call
 *   limit_unbound(overloaded, malformed, stun_per_s, stun_burst, lookups_per_s, lookups_burst)
 *     the worker-wide hand-up budgets (unbound STUN; Redis lookups)
 *
 * The binding table is a slab of entries (stable indices) under an open-addressing index
 * keyed by the client address; the Python Router calls add/remove from its one
 * install/remove path, so no packet ever calls into Python to find a route.
 *
 * pump_public: recvmmsg (64 per call, up to 8 calls), then per datagram, by first byte
 * (RFC 7983): DTLS/SRTP from a bound client are framed (relay-framing-v1: "VE", 1, flags, port, address; the header is
 * its own iovec) and sent with sendmmsg to the binding's transceiver (with `gso`, runs to one
 * transceiver as UDP_SEGMENT messages: send_gso). Unknown class: counted
 * drop. Unbound DTLS/SRTP: the per-source bucket (IPv4 address, IPv6 /64) first
 * (RATE_LIMITED), then NO_BINDING, handed up as kind 2 (empty data) when `lookups` is set so
 * Python asks Redis. Unbound STUN over the bucket: RATE_LIMITED, else handed up as kind 1
 * (admitted: Python skips its own per-IP bucket). Unbound STUN is first checked in C
 * for a well-formed header (MALFORMED, as stun.parse would say), then charged against a
 * budget for the whole worker (limit_unbound: the verification budget, OVERLOADED beyond
 * it), so a flood from many (spoofed) sources, which no per-source bucket stops, costs C
 * a drop per datagram and never more than that many Python calls a second; the lookups
 * of kind 2 have such a budget of their own (beyond it: no lookup, still NO_BINDING).
 * STUN from a bound client (consent checks,
 * ICE restarts, responses: a few packets a second per call) is handed up as kind 0. Python routes kinds 0 and 1 with the
 * unchanged router and counts what it decides; C counts only what it decides itself.
 *
 * pump_internal: a frame whose header names a bound client (flags 0 or IPv6 only) and
 * whose source is that binding's transceiver is unwrapped and sent from the binding's public
 * socket; anything else goes up to the Python router, which counts its drop reason.
 *
 * A CPython extension rather than a ctypes .so: the hand-up lists and the activity list
 * hold Python objects (bytes, the Binding itself), which ctypes would copy through an extra
 * layer per call; the build and loading are the ones libs/fastio already uses. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include "libs/fastio/native/address.h"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define ROUNDS 8
#define RX_SIZE 2048
#define MAX_VIAS 16
#define MAX_REASONS 64
#define HEADER_V4 10
#define HEADER_V6 22
#define C2T 0
#define T2C 1
#define CLS_OTHER 0
#define CLS_STUN 1
#define CLS_DTLS 2
#define CLS_SRTP 3
#define SLOT_EMPTY 0u
#define SLOT_DEAD 0xFFFFFFFFu
#define GSO_MAX_SEGMENTS 64 /* the kernel's UDP_MAX_SEGMENTS before Linux 6.9 */
#define GSO_MAX_BYTES 65000 /* one UDP datagram's payload at most (65507) */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h */
#endif

typedef struct {
  uint8_t family; /* AF_INET or AF_INET6; 0: free slab entry */
  uint8_t via;
  uint8_t touched; /* in the dirty list */
  uint8_t seen;    /* a client packet since the last take_activity (refreshes last_seen) */
  uint16_t port; /* host order */
  uint8_t addr[16];
  uint32_t packets, bytes; /* since the last take_activity */
  struct sockaddr_in6 media; /* or a sockaddr_in in its first bytes */
  socklen_t media_len;
  PyObject *binding; /* the Python Binding (strong reference) */
} Entry;

typedef struct {
  uint64_t key; /* IPv4 address | 1 << 63, or the IPv6 /64 prefix with bit 63 clear */
  double tokens, last;
} Bucket;

/* One budget for the whole worker (no key): rate 0 = unlimited. */
typedef struct {
  double tokens, last, rate, burst;
} Budget;

typedef struct {
  Bucket *slots;
  uint32_t cap, count, max_keys; /* cap: power of two >= 2 * max_keys */
} Buckets;

typedef struct {
  PyObject_HEAD
  int internal_fd;
  int public_fds[MAX_VIAS];
  int n_public;
  uint8_t classes[256];
  int reason_unknown_class, reason_rate_limited, reason_no_binding, reason_send_failed;
  int lookups;
  int gso;                                        /* UDP_SEGMENT on the internal socket */
  uint64_t gso_messages, gso_segments, gso_refused; /* totals, for stats() */
  double rate, burst;
  Buckets stun, media;
  int reason_overloaded, reason_malformed;
  Budget stun_handups, lookup_handups;
  Entry *slab;
  uint32_t slab_cap, slab_used, free_head; /* free list threads through media_len */
  uint32_t *index; /* slab index + 1, SLOT_EMPTY or SLOT_DEAD */
  uint32_t index_cap, index_live, index_dead;
  uint32_t *dirty;
  uint32_t dirty_len, dirty_cap;
  uint64_t rx_p[2][4], rx_b[2][4], fwd_p[2][4], fwd_b[2][4];
  uint64_t drop_p[2][MAX_REASONS], drop_b[2][MAX_REASONS];
  uint8_t rx[BATCH][RX_SIZE];
  uint8_t headers[BATCH][HEADER_V6];
} Core;

/* ---- hashing and the binding index ---------------------------------------------------- */

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

static uint64_t key_hash(uint8_t family, const uint8_t *addr, uint16_t port) {
  uint64_t a, b = 0;
  memcpy(&a, addr, 8);
  if (family == AF_INET6) memcpy(&b, addr + 8, 8);
  return mix(a ^ mix(b ^ ((uint64_t)port << 8) ^ family));
}

static int key_equal(const Entry *e, uint8_t family, const uint8_t *addr, uint16_t port) {
  return e->family == family && e->port == port &&
         memcmp(e->addr, addr, family == AF_INET ? 4 : 16) == 0;
}

/* The index position holding the entry, or -1; *insert_at: where a new key would go. */
static int64_t index_find(Core *c, uint8_t family, const uint8_t *addr, uint16_t port,
                          int64_t *insert_at) {
  uint32_t mask = c->index_cap - 1;
  uint32_t pos = (uint32_t)key_hash(family, addr, port) & mask;
  int64_t first_dead = -1;
  for (uint32_t probe = 0; probe < c->index_cap; probe++, pos = (pos + 1) & mask) {
    uint32_t slot = c->index[pos];
    if (slot == SLOT_EMPTY) {
      if (insert_at) *insert_at = first_dead >= 0 ? first_dead : pos;
      return -1;
    }
    if (slot == SLOT_DEAD) {
      if (first_dead < 0) first_dead = pos;
      continue;
    }
    if (key_equal(&c->slab[slot - 1], family, addr, port)) return pos;
  }
  if (insert_at) *insert_at = first_dead;
  return -1;
}

static Entry *lookup(Core *c, uint8_t family, const uint8_t *addr, uint16_t port) {
  int64_t pos = index_find(c, family, addr, port, NULL);
  return pos < 0 ? NULL : &c->slab[c->index[pos] - 1];
}

static int index_rebuild(Core *c, uint32_t cap) {
  uint32_t *fresh = calloc(cap, sizeof *fresh);
  if (fresh == NULL) return -1;
  free(c->index);
  c->index = fresh;
  c->index_cap = cap;
  c->index_dead = 0;
  c->index_live = 0;
  for (uint32_t i = 0; i < c->slab_cap; i++) {
    Entry *e = &c->slab[i];
    if (!e->family) continue;
    uint32_t pos = (uint32_t)key_hash(e->family, e->addr, e->port) & (cap - 1);
    while (fresh[pos] != SLOT_EMPTY) pos = (pos + 1) & (cap - 1);
    fresh[pos] = i + 1;
    c->index_live++;
  }
  return 0;
}

static int slab_grow(Core *c) {
  uint32_t cap = c->slab_cap ? c->slab_cap * 2 : 1024;
  Entry *slab = realloc(c->slab, (size_t)cap * sizeof *slab);
  if (slab == NULL) return -1;
  memset(slab + c->slab_cap, 0, (size_t)(cap - c->slab_cap) * sizeof *slab);
  for (uint32_t i = cap; i-- > c->slab_cap;) {
    slab[i].media_len = c->free_head;
    c->free_head = i + 1;
  }
  c->slab = slab;
  c->slab_cap = cap;
  return 0;
}

/* ---- per-source token buckets (unbound addresses) -------------------------------------- */

static int buckets_init(Buckets *b, uint32_t max_keys) {
  uint32_t cap = 16;
  while (cap < 2 * max_keys) cap *= 2;
  b->slots = calloc(cap, sizeof *b->slots);
  b->cap = cap;
  b->count = 0;
  b->max_keys = max_keys < 2 ? 2 : max_keys;
  return b->slots ? 0 : -1;
}

/* KeyedBuckets.take: a new key starts full (minus this packet). When the table holds
 * max_keys, it is cleared (Python forgets the oldest half): a forgotten key starts again
 * with a full bucket, so a flood of fresh keys still gains at most one burst per key. */
static int buckets_take(Core *c, Buckets *b, uint64_t key, double now) {
  uint32_t mask = b->cap - 1, pos = (uint32_t)mix(key) & mask;
  for (;; pos = (pos + 1) & mask) {
    Bucket *s = &b->slots[pos];
    if (s->key == key) {
      double tokens = s->tokens + (now - s->last) * c->rate;
      if (tokens > c->burst) tokens = c->burst;
      s->last = now;
      if (tokens < 1.0) {
        s->tokens = tokens;
        return 0;
      }
      s->tokens = tokens - 1.0;
      return 1;
    }
    if (s->key == 0) break;
  }
  if (b->count >= b->max_keys) {
    memset(b->slots, 0, (size_t)b->cap * sizeof *b->slots);
    b->count = 0;
    pos = (uint32_t)mix(key) & mask;
  }
  b->slots[pos] = (Bucket){key, c->burst - 1.0, now};
  b->count++;
  return c->burst >= 1.0;
}

static int budget_take(Budget *b, double now) {
  if (b->rate <= 0) return 1;
  b->tokens += (now - b->last) * b->rate;
  if (b->tokens > b->burst) b->tokens = b->burst;
  b->last = now;
  if (b->tokens < 1.0) return 0;
  b->tokens -= 1.0;
  return 1;
}

/* The header checks of libs/wire/stun.parse (RFC 8489 §5), those it raises on before any
 * attribute: a datagram failing them is MALFORMED there too. */
static int stun_header_ok(const uint8_t *d, uint32_t size) {
  if (size < 20 || (d[0] & 0xC0)) return 0;
  if (d[4] != 0x21 || d[5] != 0x12 || d[6] != 0xA4 || d[7] != 0x42) return 0;
  uint32_t length = (uint32_t)d[2] << 8 | d[3];
  return length % 4 == 0 && length + 20 == size;
}

static uint64_t source_key(const struct sockaddr_storage *ss) {
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
    return (uint64_t)ntohl(sin->sin_addr.s_addr) | (1ULL << 63);
  }
  const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
  uint64_t prefix;
  memcpy(&prefix, sin6->sin6_addr.s6_addr, 8);
  prefix &= ~(1ULL << 63);
  return prefix ? prefix : 1; /* never the empty key 0 */
}

static double monotonic(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- helpers ----------------------------------------------------------------------------- */

static int parse_ip(const char *host, uint8_t *family, uint8_t *addr) {
  memset(addr, 0, 16);
  if (inet_pton(AF_INET, host, addr) == 1) {
    *family = AF_INET;
    return 0;
  }
  if (inet_pton(AF_INET6, host, addr) == 1) {
    *family = AF_INET6;
    return 0;
  }
  PyErr_Format(PyExc_ValueError, "not an IP literal: %s", host);
  return -1;
}

static void client_of(const struct sockaddr_storage *ss, uint8_t *family, uint8_t *addr,
                      uint16_t *port) {
  memset(addr, 0, 16);
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
    *family = AF_INET;
    memcpy(addr, &sin->sin_addr, 4);
    *port = ntohs(sin->sin_port);
  } else {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
    *family = AF_INET6;
    memcpy(addr, &sin6->sin6_addr, 16);
    *port = ntohs(sin6->sin6_port);
  }
}

static int same_source(const Entry *e, const struct sockaddr_storage *ss) {
  if (ss->ss_family != ((const struct sockaddr *)&e->media)->sa_family) return 0;
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    const struct sockaddr_in *b = (const struct sockaddr_in *)&e->media;
    return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
  }
  const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
  return a->sin6_port == e->media.sin6_port &&
         memcmp(&a->sin6_addr, &e->media.sin6_addr, 16) == 0;
}

static void touch(Core *c, Entry *e, uint32_t size) {
  e->packets++;
  e->bytes += size;
  if (!e->touched) {
    e->touched = 1;
    if (c->dirty_len == c->dirty_cap) {
      uint32_t cap = c->dirty_cap ? c->dirty_cap * 2 : 1024;
      uint32_t *grown = realloc(c->dirty, (size_t)cap * sizeof *grown);
      if (grown == NULL) return; /* activity of this one is lost; forwarding goes on */
      c->dirty = grown;
      c->dirty_cap = cap;
    }
    c->dirty[c->dirty_len++] = (uint32_t)(e - c->slab);
  }
}

static void drop(Core *c, int direction, int reason, uint32_t size) {
  c->drop_p[direction][reason]++;
  c->drop_b[direction][reason] += size;
}

/* Clients with a packet handed up during one pump call: their later packets of the call go
 * up too, in order, so a DTLS packet right behind the Binding request that binds its client
 * (or an ICE restart that moves it) is routed as the Python path would. */
typedef struct {
  int n;
  uint8_t family[BATCH];
  uint16_t port[BATCH];
  uint8_t addr[BATCH][16];
} Pending;

static int pending_has(const Pending *p, uint8_t family, const uint8_t *addr, uint16_t port) {
  if (p->n > BATCH) return 1; /* overflowed: everything goes up */
  for (int i = 0; i < p->n; i++)
    if (p->port[i] == port && p->family[i] == family && memcmp(p->addr[i], addr, 16) == 0)
      return 1;
  return 0;
}

static void pending_add(Pending *p, uint8_t family, const uint8_t *addr, uint16_t port) {
  if (p->n >= BATCH) {
    p->n = BATCH + 1;
    return;
  }
  p->family[p->n] = family;
  p->port[p->n] = port;
  memcpy(p->addr[p->n], addr, 16);
  p->n++;
}

static int hand_up(PyObject *out, const uint8_t *data, Py_ssize_t size,
                   const struct sockaddr_storage *from, int kind) {
  PyObject *bytes = PyBytes_FromStringAndSize((const char *)data, size);
  PyObject *addr = address_tuple(from);
  PyObject *item = NULL;
  if (bytes && addr) item = kind < 0 ? PyTuple_Pack(2, bytes, addr)
                                     : Py_BuildValue("(OOi)", bytes, addr, kind);
  Py_XDECREF(bytes);
  Py_XDECREF(addr);
  if (item == NULL) return -1;
  int rc = PyList_Append(out, item);
  Py_DECREF(item);
  return rc;
}

/* ---- the Core type ----------------------------------------------------------------------- */

static int Core_init(Core *c, PyObject *args, PyObject *kwds) {
  PyObject *fds;
  Py_buffer classes, reasons;
  unsigned int max_keys;
  c->gso = 0;
  if (!PyArg_ParseTuple(args, "iO!y*y*ddIp|p", &c->internal_fd, &PyTuple_Type, &fds, &classes,
                        &reasons, &c->rate, &c->burst, &max_keys, &c->lookups, &c->gso))
    return -1;
  int ok = classes.len == 256 && reasons.len == 4 && PyTuple_GET_SIZE(fds) >= 1 &&
           PyTuple_GET_SIZE(fds) <= MAX_VIAS;
  if (ok) {
    memcpy(c->classes, classes.buf, 256);
    const uint8_t *r = reasons.buf;
    c->reason_unknown_class = r[0];
    c->reason_rate_limited = r[1];
    c->reason_no_binding = r[2];
    c->reason_send_failed = r[3];
    for (int i = 0; i < 4; i++) ok = ok && r[i] < MAX_REASONS;
  }
  PyBuffer_Release(&classes);
  PyBuffer_Release(&reasons);
  if (!ok) {
    PyErr_SetString(PyExc_ValueError, "bad Core arguments");
    return -1;
  }
  c->n_public = (int)PyTuple_GET_SIZE(fds);
  for (int i = 0; i < c->n_public; i++) {
    c->public_fds[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(fds, i));
    if (PyErr_Occurred()) return -1;
  }
  if (c->index == NULL) {
    if (buckets_init(&c->stun, max_keys) < 0 || buckets_init(&c->media, max_keys) < 0 ||
        index_rebuild(c, 2048) < 0) {
      PyErr_NoMemory();
      return -1;
    }
  }
  return 0;
}

static void Core_dealloc(Core *c) {
  for (uint32_t i = 0; i < c->slab_cap; i++)
    if (c->slab[i].family) Py_XDECREF(c->slab[i].binding);
  free(c->slab);
  free(c->index);
  free(c->dirty);
  free(c->stun.slots);
  free(c->media.slots);
  Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_add(Core *c, PyObject *args) {
  const char *client_ip, *media_ip;
  int client_port, media_port, via;
  PyObject *binding;
  if (!PyArg_ParseTuple(args, "sisiiO", &client_ip, &client_port, &media_ip, &media_port, &via,
                        &binding))
    return NULL;
  uint8_t family, addr[16], media_family, media_addr[16];
  if (parse_ip(client_ip, &family, addr) < 0 || parse_ip(media_ip, &media_family, media_addr) < 0)
    return NULL;
  if (client_port < 0 || client_port > 0xFFFF || media_port < 0 || media_port > 0xFFFF ||
      via < 0 || via >= c->n_public) {
    PyErr_SetString(PyExc_ValueError, "port or via out of range");
    return NULL;
  }
  int64_t insert_at = -1;
  int64_t pos = index_find(c, family, addr, (uint16_t)client_port, &insert_at);
  Entry *e;
  if (pos >= 0) {
    e = &c->slab[c->index[pos] - 1];
    Py_DECREF(e->binding);
  } else {
    if ((uint64_t)(c->index_live + c->index_dead + 1) * 2 > c->index_cap) {
      uint32_t cap = c->index_cap;
      while ((uint64_t)(c->index_live + 1) * 2 > cap / 2) cap *= 2; /* live <= 1/4 after */
      if (index_rebuild(c, cap) < 0) return PyErr_NoMemory();
      index_find(c, family, addr, (uint16_t)client_port, &insert_at);
    }
    if (c->free_head == 0 && slab_grow(c) < 0) return PyErr_NoMemory();
    uint32_t slot = c->free_head - 1;
    e = &c->slab[slot];
    c->free_head = e->media_len;
    memset(e, 0, sizeof *e);
    e->family = family;
    memcpy(e->addr, addr, 16);
    e->port = (uint16_t)client_port;
    if (c->index[insert_at] == SLOT_DEAD) c->index_dead--;
    c->index[insert_at] = slot + 1;
    c->index_live++;
    c->slab_used++;
  }
  memset(&e->media, 0, sizeof e->media);
  if (media_family == AF_INET) {
    struct sockaddr_in *sin = (struct sockaddr_in *)&e->media;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)media_port);
    memcpy(&sin->sin_addr, media_addr, 4);
    e->media_len = sizeof *sin;
  } else {
    e->media.sin6_family = AF_INET6;
    e->media.sin6_port = htons((uint16_t)media_port);
    memcpy(&e->media.sin6_addr, media_addr, 16);
    e->media_len = sizeof e->media;
  }
  e->via = (uint8_t)via;
  Py_INCREF(binding);
  e->binding = binding;
  Py_RETURN_NONE;
}

static PyObject *Core_remove(Core *c, PyObject *args) {
  const char *client_ip;
  int client_port;
  if (!PyArg_ParseTuple(args, "si", &client_ip, &client_port)) return NULL;
  uint8_t family, addr[16];
  if (parse_ip(client_ip, &family, addr) < 0) return NULL;
  int64_t pos = index_find(c, family, addr, (uint16_t)client_port, NULL);
  if (pos < 0) Py_RETURN_FALSE;
  uint32_t slot = c->index[pos] - 1;
  Entry *e = &c->slab[slot];
  Py_CLEAR(e->binding);
  memset(e, 0, sizeof *e); /* touched = 0: a stale dirty index is skipped */
  e->media_len = c->free_head;
  c->free_head = slot + 1;
  c->index[pos] = SLOT_DEAD;
  c->index_live--;
  c->index_dead++;
  c->slab_used--;
  Py_RETURN_TRUE;
}

static PyObject *Core_set_via(Core *c, PyObject *args) {
  const char *client_ip;
  int client_port, via;
  if (!PyArg_ParseTuple(args, "sii", &client_ip, &client_port, &via)) return NULL;
  uint8_t family, addr[16];
  if (parse_ip(client_ip, &family, addr) < 0) return NULL;
  Entry *e = lookup(c, family, addr, (uint16_t)client_port);
  if (e != NULL && via >= 0 && via < c->n_public) e->via = (uint8_t)via;
  Py_RETURN_NONE;
}

/* One recvmmsg of up to BATCH datagrams into the core's receive buffers. */
static int recv_round(Core *c, int fd, struct mmsghdr *msgs, struct iovec *iov,
                      struct sockaddr_storage *from) {
  memset(msgs, 0, sizeof(struct mmsghdr) * BATCH);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = c->rx[i];
    iov[i].iov_len = RX_SIZE;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &from[i];
    msgs[i].msg_hdr.msg_namelen = sizeof from[i];
  }
  return recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
}

/* Client -> transceiver, one datagram per message. */
static void send_plain(Core *c, struct mmsghdr *tx, const uint32_t *tx_size, int ntx) {
  int sent = 0;
  while (sent < ntx) {
    int k = sendmmsg(c->internal_fd, tx + sent, ntx - sent, MSG_DONTWAIT);
    if (k <= 0) break;
    sent += k;
  }
  for (int i = sent; i < ntx; i++) drop(c, C2T, c->reason_send_failed, tx_size[i]);
}

static int same_destination(const struct msghdr *a, const struct msghdr *b) {
  return a->msg_namelen == b->msg_namelen &&
         (a->msg_name == b->msg_name || memcmp(a->msg_name, b->msg_name, a->msg_namelen) == 0);
}

typedef union {
  char buf[CMSG_SPACE(sizeof(uint16_t))];
  struct cmsghdr align;
} SegmentControl;

/* Client -> transceiver with UDP segmentation offload (UDP_SEGMENT, Linux 4.18): a run of
 * consecutive framed datagrams to the same transceiver, all of one size but the last (which
 * may be shorter: the kernel's rule), goes as one message whose iovecs are the run's
 * header/payload pairs, and the stack cuts it into the same datagrams past routing, so one
 * trip through the IP output path carries up to GSO_MAX_SEGMENTS packets. The transceiver
 * still receives separate datagrams (the kernel segments a looped or forwarded GSO packet
 * before a socket without UDP_GRO sees it). Runs of one stay plain messages; all go in one
 * sendmmsg. A kernel or device that refuses the offload (EIO: no checksum offload on the
 * route; EINVAL: a segment above the path MTU) switches it off for this core, counted in
 * gso_refused, and the rest of the batch goes plain. */
static void send_gso(Core *c, struct mmsghdr *tx, struct iovec (*tx_iov)[2],
                     const uint32_t *tx_size, int ntx) {
  struct mmsghdr groups[BATCH];
  SegmentControl control[BATCH];
  int first[BATCH + 1], ng = 0;
  for (int i = 0; i < ntx;) {
    uint32_t segment = tx_size[i], total = segment;
    int j = i + 1;
    while (j < ntx && j - i < GSO_MAX_SEGMENTS && tx_size[j] <= segment &&
           total + tx_size[j] <= GSO_MAX_BYTES && same_destination(&tx[i].msg_hdr, &tx[j].msg_hdr)) {
      total += tx_size[j];
      if (tx_size[j++] < segment) break; /* a shorter datagram ends the run */
    }
    struct msghdr *g = &groups[ng].msg_hdr;
    memset(&groups[ng], 0, sizeof groups[ng]);
    g->msg_name = tx[i].msg_hdr.msg_name;
    g->msg_namelen = tx[i].msg_hdr.msg_namelen;
    g->msg_iov = tx_iov[i]; /* the run's pairs are contiguous in tx_iov */
    g->msg_iovlen = 2 * (size_t)(j - i);
    if (j - i > 1) {
      g->msg_control = control[ng].buf;
      g->msg_controllen = sizeof control[ng].buf;
      struct cmsghdr *cm = CMSG_FIRSTHDR(g);
      cm->cmsg_level = SOL_UDP;
      cm->cmsg_type = UDP_SEGMENT;
      cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
      uint16_t size = (uint16_t)segment;
      memcpy(CMSG_DATA(cm), &size, sizeof size);
    }
    first[ng++] = i;
    i = j;
  }
  first[ng] = ntx;
  int sent = 0;
  while (sent < ng) {
    int k = sendmmsg(c->internal_fd, groups + sent, ng - sent, MSG_DONTWAIT);
    if (k > 0) {
      for (int g = sent; g < sent + k; g++)
        if (first[g + 1] - first[g] > 1) {
          c->gso_messages++;
          c->gso_segments += (uint64_t)(first[g + 1] - first[g]);
        }
      sent += k;
      continue;
    }
    if (k < 0 && (errno == EIO || errno == EINVAL) && first[sent + 1] - first[sent] > 1) {
      c->gso = 0;
      c->gso_refused++;
      send_plain(c, tx + first[sent], tx_size + first[sent], ntx - first[sent]);
      return;
    }
    break;
  }
  for (int i = first[sent]; i < ntx; i++) drop(c, C2T, c->reason_send_failed, tx_size[i]);
}

static PyObject *Core_pump_public(Core *c, PyObject *args) {
  int via;
  if (!PyArg_ParseTuple(args, "i", &via)) return NULL;
  if (via < 0 || via >= c->n_public) {
    PyErr_SetString(PyExc_ValueError, "via out of range");
    return NULL;
  }
  PyObject *out = PyList_New(0);
  if (out == NULL) return NULL;
  struct mmsghdr msgs[BATCH], tx[BATCH];
  struct iovec iov[BATCH], tx_iov[BATCH][2];
  struct sockaddr_storage from[BATCH];
  uint32_t tx_size[BATCH];
  Pending pending;
  pending.n = 0;
  double now = monotonic();
  for (int round = 0; round < ROUNDS; round++) {
    int n = recv_round(c, c->public_fds[via], msgs, iov, from);
    if (n <= 0) break;
    int ntx = 0;
    for (int i = 0; i < n; i++) {
      uint8_t *data = c->rx[i];
      /* Longer than RX_SIZE: truncated, handled as empty (an UNKNOWN_CLASS drop). */
      uint32_t size = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : msgs[i].msg_len;
      int kind = size ? c->classes[data[0]] : CLS_OTHER;
      if (kind == CLS_OTHER) {
        c->rx_p[C2T][kind]++;
        c->rx_b[C2T][kind] += size;
        drop(c, C2T, c->reason_unknown_class, size);
        continue;
      }
      uint8_t family, addr[16];
      uint16_t port;
      client_of(&from[i], &family, addr, &port);
      Entry *e = lookup(c, family, addr, port);
      if (pending.n && pending_has(&pending, family, addr, port)) {
        if (hand_up(out, data, size, &from[i], 0) < 0) goto fail;
        continue;
      }
      if (e == NULL) {
        Buckets *b = kind == CLS_STUN ? &c->stun : &c->media;
        if (!buckets_take(c, b, source_key(&from[i]), now)) {
          c->rx_p[C2T][kind]++;
          c->rx_b[C2T][kind] += size;
          drop(c, C2T, c->reason_rate_limited, size);
          continue;
        }
        if (kind == CLS_STUN) {
          int reason = c->reason_malformed && !stun_header_ok(data, size) ? c->reason_malformed
                       : !budget_take(&c->stun_handups, now)             ? c->reason_overloaded
                                                                         : -1;
          if (reason >= 0) {
            c->rx_p[C2T][kind]++;
            c->rx_b[C2T][kind] += size;
            drop(c, C2T, reason, size);
            continue;
          }
          if (hand_up(out, data, size, &from[i], 1) < 0) goto fail;
          pending_add(&pending, family, addr, port);
          continue;
        }
        c->rx_p[C2T][kind]++;
        c->rx_b[C2T][kind] += size;
        drop(c, C2T, c->reason_no_binding, size);
        if (c->lookups && budget_take(&c->lookup_handups, now) &&
            hand_up(out, data, 0, &from[i], 2) < 0)
          goto fail;
        continue;
      }
      /* STUN from a bound client (consent checks, ICE restarts, responses): the Python
       * router parses it, so malformed ones are dropped exactly as there. */
      if (kind == CLS_STUN) {
        if (hand_up(out, data, size, &from[i], 0) < 0) goto fail;
        pending_add(&pending, family, addr, port);
        continue;
      }
      c->rx_p[C2T][kind]++;
      c->rx_b[C2T][kind] += size;
      c->fwd_p[C2T][kind]++;
      c->fwd_b[C2T][kind] += size;
      e->via = (uint8_t)via;
      e->seen = 1;
      touch(c, e, size);
      uint8_t *h = c->headers[ntx];
      h[0] = 'V';
      h[1] = 'E';
      h[2] = 1;
      h[3] = family == AF_INET6 ? 1 : 0;
      h[4] = (uint8_t)(port >> 8);
      h[5] = (uint8_t)port;
      memcpy(h + 6, addr, family == AF_INET6 ? 16 : 4);
      tx_iov[ntx][0].iov_base = h;
      tx_iov[ntx][0].iov_len = family == AF_INET6 ? HEADER_V6 : HEADER_V4;
      tx_iov[ntx][1].iov_base = data;
      tx_iov[ntx][1].iov_len = size;
      memset(&tx[ntx], 0, sizeof tx[ntx]);
      tx[ntx].msg_hdr.msg_iov = tx_iov[ntx];
      tx[ntx].msg_hdr.msg_iovlen = 2;
      tx[ntx].msg_hdr.msg_name = &e->media;
      tx[ntx].msg_hdr.msg_namelen = e->media_len;
      tx_size[ntx] = size + (uint32_t)tx_iov[ntx][0].iov_len;
      ntx++;
    }
    if (c->gso)
      send_gso(c, tx, tx_iov, tx_size, ntx);
    else
      send_plain(c, tx, tx_size, ntx);
    if (n < BATCH) break;
  }
  return out;
fail:
  Py_DECREF(out);
  return NULL;
}

static PyObject *Core_pump_internal(Core *c, PyObject *noargs) {
  PyObject *out = PyList_New(0);
  if (out == NULL) return NULL;
  struct mmsghdr msgs[BATCH], tx[BATCH];
  struct iovec iov[BATCH], tx_iov[BATCH];
  struct sockaddr_storage from[BATCH], to[BATCH];
  uint8_t tx_via[BATCH];
  for (int round = 0; round < ROUNDS; round++) {
    int n = recv_round(c, c->internal_fd, msgs, iov, from);
    if (n <= 0) break;
    int ntx = 0;
    for (int i = 0; i < n; i++) {
      uint8_t *frame = c->rx[i];
      uint32_t size = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : msgs[i].msg_len;
      Entry *e = NULL;
      uint32_t header = 0;
      if (size >= HEADER_V4 && frame[0] == 'V' && frame[1] == 'E' && frame[2] == 1 &&
          (frame[3] == 0 || (frame[3] == 1 && size >= HEADER_V6))) {
        uint8_t addr[16] = {0};
        int v6 = frame[3] == 1;
        header = v6 ? HEADER_V6 : HEADER_V4;
        memcpy(addr, frame + 6, v6 ? 16 : 4);
        e = lookup(c, v6 ? AF_INET6 : AF_INET, addr, (uint16_t)(frame[4] << 8 | frame[5]));
      }
      if (e == NULL || !same_source(e, &from[i])) {
        if (hand_up(out, frame, size, &from[i], -1) < 0) goto fail;
        continue;
      }
      uint32_t payload = size - header;
      int kind = payload ? c->classes[frame[header]] : CLS_OTHER;
      c->rx_p[T2C][kind]++;
      c->rx_b[T2C][kind] += payload;
      c->fwd_p[T2C][kind]++;
      c->fwd_b[T2C][kind] += payload;
      touch(c, e, payload);
      memset(&to[ntx], 0, sizeof to[ntx]);
      if (e->family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&to[ntx];
        sin->sin_family = AF_INET;
        sin->sin_port = htons(e->port);
        memcpy(&sin->sin_addr, e->addr, 4);
        tx[ntx].msg_hdr.msg_namelen = sizeof *sin;
      } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&to[ntx];
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(e->port);
        memcpy(&sin6->sin6_addr, e->addr, 16);
        tx[ntx].msg_hdr.msg_namelen = sizeof *sin6;
      }
      tx_iov[ntx].iov_base = frame + header;
      tx_iov[ntx].iov_len = payload;
      tx[ntx].msg_hdr.msg_name = &to[ntx];
      tx[ntx].msg_hdr.msg_iov = &tx_iov[ntx];
      tx[ntx].msg_hdr.msg_iovlen = 1;
      tx[ntx].msg_hdr.msg_control = NULL;
      tx[ntx].msg_hdr.msg_controllen = 0;
      tx[ntx].msg_hdr.msg_flags = 0;
      tx_via[ntx] = e->via;
      ntx++;
    }
    /* One sendmmsg per public socket, in arrival order within each. */
    for (int v = 0; v < c->n_public && ntx; v++) {
      struct mmsghdr group[BATCH];
      int count = 0;
      for (int i = 0; i < ntx; i++)
        if (tx_via[i] == v) group[count++] = tx[i];
      int sent = 0;
      while (sent < count) {
        int k = sendmmsg(c->public_fds[v], group + sent, count - sent, MSG_DONTWAIT);
        if (k <= 0) break;
        sent += k;
      }
      for (int i = sent; i < count; i++)
        drop(c, T2C, c->reason_send_failed, (uint32_t)group[i].msg_hdr.msg_iov->iov_len);
    }
    if (n < BATCH) break;
  }
  return out;
fail:
  Py_DECREF(out);
  return NULL;
}

static PyObject *Core_take_activity(Core *c, PyObject *noargs) {
  PyObject *out = PyList_New(0);
  if (out == NULL) return NULL;
  for (uint32_t i = 0; i < c->dirty_len; i++) {
    Entry *e = &c->slab[c->dirty[i]];
    if (!e->family || !e->touched) continue;
    PyObject *item = Py_BuildValue("(OIIiO)", e->binding, e->packets, e->bytes, (int)e->via,
                                   e->seen ? Py_True : Py_False);
    if (item == NULL || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return NULL;
    }
    Py_DECREF(item);
    e->touched = e->seen = 0;
    e->packets = e->bytes = 0;
  }
  c->dirty_len = 0;
  return out;
}

static PyObject *matrix(uint64_t *values, int columns) {
  PyObject *rows = PyList_New(2);
  if (rows == NULL) return NULL;
  for (int d = 0; d < 2; d++) {
    PyObject *row = PyList_New(columns);
    if (row == NULL) {
      Py_DECREF(rows);
      return NULL;
    }
    for (int k = 0; k < columns; k++) {
      PyObject *v = PyLong_FromUnsignedLongLong(values[d * columns + k]);
      if (v == NULL) {
        Py_DECREF(row);
        Py_DECREF(rows);
        return NULL;
      }
      PyList_SET_ITEM(row, k, v);
    }
    PyList_SET_ITEM(rows, d, row);
  }
  return rows;
}

static PyObject *Core_take_counters(Core *c, PyObject *noargs) {
  PyObject *result = Py_BuildValue("(NNNNNN)", matrix(&c->rx_p[0][0], 4), matrix(&c->rx_b[0][0], 4),
                                   matrix(&c->fwd_p[0][0], 4), matrix(&c->fwd_b[0][0], 4),
                                   matrix(&c->drop_p[0][0], MAX_REASONS),
                                   matrix(&c->drop_b[0][0], MAX_REASONS));
  if (result == NULL) return NULL;
  memset(c->rx_p, 0, sizeof c->rx_p);
  memset(c->rx_b, 0, sizeof c->rx_b);
  memset(c->fwd_p, 0, sizeof c->fwd_p);
  memset(c->fwd_b, 0, sizeof c->fwd_b);
  memset(c->drop_p, 0, sizeof c->drop_p);
  memset(c->drop_b, 0, sizeof c->drop_b);
  return result;
}

static PyObject *Core_limit_unbound(Core *c, PyObject *args) {
  int overloaded, malformed;
  double rate, burst, lookup_rate, lookup_burst;
  if (!PyArg_ParseTuple(args, "iidddd", &overloaded, &malformed, &rate, &burst, &lookup_rate,
                        &lookup_burst))
    return NULL;
  if (overloaded < 0 || overloaded >= MAX_REASONS || malformed < 0 || malformed >= MAX_REASONS ||
      rate < 0 || burst < 1 || lookup_rate < 0 || lookup_burst < 1) {
    PyErr_SetString(PyExc_ValueError, "bad limit_unbound arguments");
    return NULL;
  }
  c->reason_overloaded = overloaded;
  c->reason_malformed = malformed;
  double now = monotonic();
  c->stun_handups = (Budget){burst, now, rate, burst};
  c->lookup_handups = (Budget){lookup_burst, now, lookup_rate, lookup_burst};
  Py_RETURN_NONE;
}

static PyObject *Core_stats(Core *c, PyObject *noargs) {
  size_t table = (size_t)c->slab_cap * sizeof(Entry) + (size_t)c->index_cap * sizeof(uint32_t) +
                 (size_t)c->dirty_cap * sizeof(uint32_t);
  return Py_BuildValue("{sIsIsIsnsnsisKsKsK}", "bindings", c->slab_used, "slab_capacity",
                       c->slab_cap, "index_capacity", c->index_cap, "table_bytes",
                       (Py_ssize_t)table, "entry_bytes", (Py_ssize_t)sizeof(Entry), "gso",
                       c->gso, "gso_messages", (unsigned long long)c->gso_messages,
                       "gso_segments", (unsigned long long)c->gso_segments, "gso_refused",
                       (unsigned long long)c->gso_refused);
}

static PyMethodDef Core_methods[] = {
    {"add", (PyCFunction)Core_add, METH_VARARGS, "add or update one binding"},
    {"remove", (PyCFunction)Core_remove, METH_VARARGS, "remove one binding; True if it was there"},
    {"set_via", (PyCFunction)Core_set_via, METH_VARARGS, "the public socket a client talks to"},
    {"pump_public", (PyCFunction)Core_pump_public, METH_VARARGS, "client datagrams of one socket"},
    {"pump_internal", (PyCFunction)Core_pump_internal, METH_NOARGS, "transceiver frames"},
    {"take_activity", (PyCFunction)Core_take_activity, METH_NOARGS, "bindings with traffic"},
    {"take_counters", (PyCFunction)Core_take_counters, METH_NOARGS, "counter deltas"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "table size and memory"},
    {"limit_unbound", (PyCFunction)Core_limit_unbound, METH_VARARGS, "worker-wide hand-up budget"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_init, Core_init},
    {Py_tp_dealloc, Core_dealloc},
    {Py_tp_methods, Core_methods},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "the relay's native per-packet path for bound clients"},
    {0, NULL},
};

static PyType_Spec Core_spec = {"relaycore.Core", sizeof(Core), 0, Py_TPFLAGS_DEFAULT, Core_slots};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "relaycore", NULL, -1, NULL};

PyMODINIT_FUNC PyInit_relaycore(void) {
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  PyObject *type = PyType_FromSpec(&Core_spec);
  if (type == NULL || PyModule_AddObject(m, "Core", type) < 0) {
    Py_XDECREF(type);
    Py_DECREF(m);
    return NULL;
  }
  PyModule_AddIntConstant(m, "MAX_REASONS", MAX_REASONS);
  PyModule_AddIntConstant(m, "ENTRY_BYTES", (long)sizeof(Entry));
  return m;
}
