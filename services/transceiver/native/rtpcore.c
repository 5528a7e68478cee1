/* The per-packet work of the transceiver's audio RTP path (services/transceiver/rtp.py), in C.
 *
 * Receiver.datagram(srtp) : SRTP unprotect, RFC 3550 header parse, order check, loss and
 *                           jitter (RFC 3550 A.1, A.3, A.8), then sink(payload, timestamp);
 *                           with `reorder` sink(payload, timestamp, extended sequence, red)
 *                           for older packets too (a jitter buffer orders them)
 * Sender.send(payload, frame_index, ticks_per_frame) : RTP header (+ mid extension),
 *                           SRTP protect, then send(datagram)
 *
 * Same rules, counters and callbacks as rtp.RtpReceiver / rtp.RtpSender, which remain the
 * reference and the fallback when this extension is missing. SRTP is libsrtp's, reached
 * through the context and function pointers of aiortc's pylibsrtp sessions (rtpcore.py
 * looks them up and checks their C signatures); each object keeps its pylibsrtp session
 * alive. Not thread-safe, like libsrtp contexts: everything runs on the event loop. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>
#include <time.h>

#define SRTP_BUFFER 1500 /* pylibsrtp's own buffer: the same packet size limit */
#define SRTP_TRAILER_MAX 144 /* SRTP_MAX_TRAILER_LEN: auth tag + MKI */
#define SEQ_MOD 65536
#define MAX_MISORDER 100
#define OPUS_CLOCK_HZ 48000.0
#define REPORT_SAMPLE_EVERY 5

typedef int (*srtp_fn)(void *ctx, void *packet, int *length);

static int read_pointer(PyObject *value, void **out) {
  unsigned long long address = PyLong_AsUnsignedLongLong(value);
  if (PyErr_Occurred()) return -1;
  if (address == 0) {
    PyErr_SetString(PyExc_ValueError, "null SRTP pointer");
    return -1;
  }
  *out = (void *)(uintptr_t)address;
  return 0;
}

static uint32_t get_u32(const unsigned char *p) { /* network byte order */
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void put_u32(unsigned char *p, uint32_t value) {
  p[0] = (unsigned char)(value >> 24);
  p[1] = (unsigned char)(value >> 16);
  p[2] = (unsigned char)(value >> 8);
  p[3] = (unsigned char)value;
}

/* ---- Receiver */

typedef struct {
  PyObject_HEAD PyObject *owner; /* the pylibsrtp session whose context this is */
  void *ctx;
  srtp_fn unprotect;
  PyObject *sink, *on_loss, *clock; /* on_loss, clock: None or callables */
  int payload_type, red_payload_type; /* red: -1 when RED (RFC 2198) is not negotiated */
  int reorder;
  int started, have_transit;
  long long base, highest; /* extended sequence numbers */
  unsigned int source_ssrc;
  double last_transit, jitter_ticks;
  unsigned long long packets, bytes, dropped_srtp, dropped_malformed, dropped_payload_type,
      dropped_late;
} Receiver;

/* GC support: the sink is a bound method of the session that owns this receiver, a cycle
 * the collector must be able to see and break. */
static int receiver_traverse(Receiver *self, visitproc visit, void *arg) {
  Py_VISIT(self->owner);
  Py_VISIT(self->sink);
  Py_VISIT(self->on_loss);
  Py_VISIT(self->clock);
  return 0;
}

static int receiver_clear(Receiver *self) {
  Py_CLEAR(self->owner);
  Py_CLEAR(self->sink);
  Py_CLEAR(self->on_loss);
  Py_CLEAR(self->clock);
  return 0;
}

static void receiver_dealloc(Receiver *self) {
  PyObject_GC_UnTrack(self);
  receiver_clear(self);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static int receiver_init(Receiver *self, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"owner",   "context", "unprotect", "payload_type",     "sink",
                          "on_loss", "clock",   "reorder",   "red_payload_type", NULL};
  PyObject *owner, *context, *function, *sink, *on_loss = Py_None, *clock = Py_None;
  int payload_type, reorder = 0, red_payload_type = -1;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiO|OOpi", names, &owner, &context,
                                   &function, &payload_type, &sink, &on_loss, &clock, &reorder,
                                   &red_payload_type))
    return -1;
  self->reorder = reorder;
  self->red_payload_type = red_payload_type;
  void *fn;
  if (read_pointer(context, &self->ctx) < 0 || read_pointer(function, &fn) < 0) return -1;
  self->unprotect = (srtp_fn)fn;
  self->payload_type = payload_type;
  Py_INCREF(owner);
  Py_XSETREF(self->owner, owner);
  Py_INCREF(sink);
  Py_XSETREF(self->sink, sink);
  Py_INCREF(on_loss);
  Py_XSETREF(self->on_loss, on_loss);
  Py_INCREF(clock);
  Py_XSETREF(self->clock, clock);
  return 0;
}

static int now_seconds(Receiver *self, double *out) {
  if (self->clock == Py_None) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.monotonic() reads */
    *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    return 0;
  }
  PyObject *value = PyObject_CallNoArgs(self->clock);
  if (value == NULL) return -1;
  *out = PyFloat_AsDouble(value);
  Py_DECREF(value);
  return PyErr_Occurred() ? -1 : 0;
}

static PyObject *receiver_datagram(Receiver *self, PyObject *data) {
  if (self->sink == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "receiver cleared");
    return NULL;
  }
  if (!PyBytes_Check(data)) {
    PyErr_SetString(PyExc_TypeError, "datagram must be bytes");
    return NULL;
  }
  Py_ssize_t size = PyBytes_GET_SIZE(data);
  unsigned char packet[SRTP_BUFFER];
  if (size > SRTP_BUFFER) { /* cannot be ours: pylibsrtp refuses it too */
    self->dropped_srtp++;
    Py_RETURN_NONE;
  }
  memcpy(packet, PyBytes_AS_STRING(data), (size_t)size);
  int length = (int)size;
  if (self->unprotect(self->ctx, packet, &length) != 0) {
    self->dropped_srtp++;
    Py_RETURN_NONE;
  }
  /* RFC 3550 §5.1, as rtp.parse: version 2, CSRCs, extension, padding */
  if (length < 12 || (packet[0] >> 6) != 2) {
    self->dropped_malformed++;
    Py_RETURN_NONE;
  }
  int offset = 12 + 4 * (packet[0] & 0x0F), end = length;
  if (packet[0] & 0x10) {
    if (end < offset + 4) {
      self->dropped_malformed++;
      Py_RETURN_NONE;
    }
    offset += 4 + 4 * ((packet[offset + 2] << 8) | packet[offset + 3]);
  }
  if (packet[0] & 0x20) end -= packet[length - 1];
  if (offset > end) {
    self->dropped_malformed++;
    Py_RETURN_NONE;
  }
  int red = 0;
  if ((packet[1] & 0x7F) != self->payload_type) {
    if ((packet[1] & 0x7F) != self->red_payload_type) {
      self->dropped_payload_type++;
      Py_RETURN_NONE;
    }
    red = 1;
  }
  long long sequence = (packet[2] << 8) | packet[3], extended;
  uint32_t timestamp = get_u32(packet + 4);
  if (!self->started) {
    self->started = 1;
    self->base = self->highest = extended = sequence;
    self->source_ssrc = get_u32(packet + 8);
  } else {
    long long delta = (sequence - self->highest) % SEQ_MOD;
    if (delta < 0) delta += SEQ_MOD;
    if (delta == 0 || (delta > SEQ_MOD - MAX_MISORDER && !self->reorder)) {
      self->dropped_late++;
      Py_RETURN_NONE;
    }
    if (delta > SEQ_MOD - MAX_MISORDER) { /* older than the newest: the buffer reorders */
      extended = self->highest - (SEQ_MOD - delta);
    } else {
      self->highest += delta;
      extended = self->highest;
      if (delta > 1 && self->on_loss != Py_None && !self->reorder) {
        PyObject *result = PyObject_CallFunction(self->on_loss, "L", delta - 1);
        if (result == NULL) return NULL;
        Py_DECREF(result);
      }
    }
  }
  self->packets++;
  self->bytes += (unsigned long long)(end - offset);
  double now;
  if (now_seconds(self, &now) < 0) return NULL;
  double transit = now * OPUS_CLOCK_HZ - (double)timestamp;
  if (self->have_transit) {
    double difference = fabs(transit - self->last_transit);
    if (difference < (double)(1 << 30)) /* not a timestamp wrap or a new stream */
      self->jitter_ticks += (difference - self->jitter_ticks) / 16.0;
  }
  self->last_transit = transit;
  self->have_transit = 1;
  PyObject *payload = PyBytes_FromStringAndSize((const char *)packet + offset, end - offset);
  if (payload == NULL) return NULL;
  PyObject *result =
      self->reorder ? PyObject_CallFunction(self->sink, "NkLO", payload, (unsigned long)timestamp,
                                            extended, red ? Py_True : Py_False)
                    : PyObject_CallFunction(self->sink, "Nk", payload, (unsigned long)timestamp);
  if (result == NULL) return NULL;
  Py_DECREF(result);
  Py_RETURN_NONE;
}

static PyObject *receiver_started(Receiver *self, void *closure) {
  return PyBool_FromLong(self->started);
}

static PyMethodDef receiver_methods[] = {
    {"datagram", (PyCFunction)receiver_datagram, METH_O, "one SRTP datagram from the caller"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef receiver_members[] = {
    {"packets", T_ULONGLONG, offsetof(Receiver, packets), READONLY, NULL},
    {"bytes", T_ULONGLONG, offsetof(Receiver, bytes), READONLY, NULL},
    {"jitter_ticks", T_DOUBLE, offsetof(Receiver, jitter_ticks), READONLY, NULL},
    {"dropped_srtp", T_ULONGLONG, offsetof(Receiver, dropped_srtp), READONLY, NULL},
    {"dropped_malformed", T_ULONGLONG, offsetof(Receiver, dropped_malformed), READONLY, NULL},
    {"dropped_payload_type", T_ULONGLONG, offsetof(Receiver, dropped_payload_type), READONLY,
     NULL},
    {"dropped_late", T_ULONGLONG, offsetof(Receiver, dropped_late), READONLY, NULL},
    {"base", T_LONGLONG, offsetof(Receiver, base), READONLY, NULL},
    {"highest", T_LONGLONG, offsetof(Receiver, highest), READONLY, NULL},
    {"source_ssrc", T_UINT, offsetof(Receiver, source_ssrc), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef receiver_getset[] = {
    {"started", (getter)receiver_started, NULL, "a packet was accepted", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rtpcore.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)receiver_traverse,
    .tp_clear = (inquiry)receiver_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)receiver_init,
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_methods = receiver_methods,
    .tp_members = receiver_members,
    .tp_getset = receiver_getset,
};

/* ---- Sender */

typedef struct {
  PyObject_HEAD PyObject *owner;
  void *ctx;
  srtp_fn protect;
  PyObject *send, *on_sent; /* on_sent: None or a callable */
  unsigned char first_byte, payload_type;
  uint32_t ssrc, timestamp_origin;
  unsigned int sequence;
  unsigned char extension[64];
  int extension_length;
  unsigned long long packets, octets;
} Sender;

static int sender_traverse(Sender *self, visitproc visit, void *arg) {
  Py_VISIT(self->owner);
  Py_VISIT(self->send);
  Py_VISIT(self->on_sent);
  return 0;
}

static int sender_clear(Sender *self) {
  Py_CLEAR(self->owner);
  Py_CLEAR(self->send);
  Py_CLEAR(self->on_sent);
  return 0;
}

static void sender_dealloc(Sender *self) {
  PyObject_GC_UnTrack(self);
  sender_clear(self);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static int sender_init(Sender *self, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"owner",     "context",          "protect",  "payload_type", "ssrc",
                          "extension", "timestamp_origin", "sequence", "send",         "on_sent",
                          NULL};
  PyObject *owner, *context, *function, *send, *on_sent = Py_None;
  int payload_type;
  unsigned int ssrc, origin, sequence;
  const char *extension;
  Py_ssize_t extension_length;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOiIy#IIO|O", names, &owner, &context,
                                   &function, &payload_type, &ssrc, &extension,
                                   &extension_length, &origin, &sequence, &send, &on_sent))
    return -1;
  if (extension_length > (Py_ssize_t)sizeof self->extension || extension_length % 4) {
    PyErr_SetString(PyExc_ValueError, "header extension: a multiple of 4 bytes, at most 64");
    return -1;
  }
  void *fn;
  if (read_pointer(context, &self->ctx) < 0 || read_pointer(function, &fn) < 0) return -1;
  self->protect = (srtp_fn)fn;
  self->payload_type = (unsigned char)(payload_type & 0x7F);
  self->first_byte = 0x80 | (extension_length ? 0x10 : 0);
  self->ssrc = ssrc;
  self->timestamp_origin = origin;
  self->sequence = sequence & 0xFFFF;
  memcpy(self->extension, extension, (size_t)extension_length);
  self->extension_length = (int)extension_length;
  Py_INCREF(owner);
  Py_XSETREF(self->owner, owner);
  Py_INCREF(send);
  Py_XSETREF(self->send, send);
  Py_INCREF(on_sent);
  Py_XSETREF(self->on_sent, on_sent);
  return 0;
}

static PyObject *sender_send(Sender *self, PyObject *const *args, Py_ssize_t nargs) {
  if (self->send == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "sender cleared");
    return NULL;
  }
  if (nargs != 3 || !PyBytes_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "send(payload: bytes, frame_index: int, ticks: int)");
    return NULL;
  }
  unsigned long long frame_index = PyLong_AsUnsignedLongLong(args[1]);
  unsigned long long ticks = PyLong_AsUnsignedLongLong(args[2]);
  if (PyErr_Occurred()) return NULL;
  Py_ssize_t payload_length = PyBytes_GET_SIZE(args[0]);
  int header = 12 + self->extension_length;
  if (header + payload_length + SRTP_TRAILER_MAX > SRTP_BUFFER) {
    PyErr_SetString(PyExc_ValueError, "packet is too long");
    return NULL;
  }
  uint32_t timestamp = (uint32_t)((self->timestamp_origin + frame_index * ticks) & 0xFFFFFFFF);
  unsigned char packet[SRTP_BUFFER];
  packet[0] = self->first_byte;
  packet[1] = (self->packets == 0 ? 0x80 : 0) | self->payload_type; /* marker: RFC 3551 §4.1 */
  packet[2] = (unsigned char)(self->sequence >> 8);
  packet[3] = (unsigned char)self->sequence;
  put_u32(packet + 4, timestamp);
  put_u32(packet + 8, self->ssrc);
  memcpy(packet + 12, self->extension, (size_t)self->extension_length);
  memcpy(packet + header, PyBytes_AS_STRING(args[0]), (size_t)payload_length);
  int length = header + (int)payload_length;
  int status = self->protect(self->ctx, packet, &length);
  if (status != 0) {
    PyErr_Format(PyExc_RuntimeError, "srtp_protect failed with status %d", status);
    return NULL;
  }
  PyObject *datagram = PyBytes_FromStringAndSize((const char *)packet, length);
  if (datagram == NULL) return NULL;
  PyObject *result = PyObject_CallOneArg(self->send, datagram);
  Py_DECREF(datagram);
  if (result == NULL) return NULL;
  Py_DECREF(result);
  self->sequence = (self->sequence + 1) & 0xFFFF;
  self->packets++;
  self->octets += (unsigned long long)payload_length;
  if (self->on_sent != Py_None && self->packets % REPORT_SAMPLE_EVERY == 1) {
    result = PyObject_CallFunction(self->on_sent, "kKK", (unsigned long)timestamp, self->packets,
                                   self->octets);
    if (result == NULL) return NULL;
    Py_DECREF(result);
  }
  Py_RETURN_NONE;
}

static PyMethodDef sender_methods[] = {
    {"send", (PyCFunction)(void (*)(void))sender_send, METH_FASTCALL,
     "send(payload, frame_index, ticks_per_frame): one RTP packet, protected"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef sender_members[] = {
    {"packets", T_ULONGLONG, offsetof(Sender, packets), READONLY, NULL},
    {"octets", T_ULONGLONG, offsetof(Sender, octets), READONLY, NULL},
    {"sequence", T_UINT, offsetof(Sender, sequence), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rtpcore.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sender_init,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_methods = sender_methods,
    .tp_members = sender_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "rtpcore", NULL, -1, NULL};

PyMODINIT_FUNC PyInit_rtpcore(void) {
  if (PyType_Ready(&ReceiverType) < 0 || PyType_Ready(&SenderType) < 0) return NULL;
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  Py_INCREF(&ReceiverType);
  Py_INCREF(&SenderType);
  if (PyModule_AddObject(m, "Receiver", (PyObject *)&ReceiverType) < 0 ||
      PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
