/* Batched UDP I/O for the relay's data plane: recvmmsg/sendmmsg (Linux) behind two
 * functions, so one system call moves up to 64 datagrams and the routing stays in Python.
 *
 *   recv_batch(fd, max) -> list[tuple[bytes, tuple[str, int]]]   (IPv4 and IPv6)
 *   send_batch(fd, items: list[tuple[tuple[str, int], bytes]]) -> int  (datagrams sent)
 *
 * send_batch takes (destination, data, ...) tuples and ignores items after the first two, so
 * the relay router's Forward tuples (dest, data, via) go as they are.
 *
 * Non-blocking: recv_batch returns [] when nothing is queued; send_batch stops at the first
 * error (EAGAIN: socket buffer full) and returns how many went, the caller counts the rest
 * as SEND_FAILED. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include "libs/fastio/native/address.h"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BATCH 64
#define MAX_DATAGRAM 65536

static char rx_buffers[MAX_BATCH][2048];

static PyObject *recv_batch(PyObject *self, PyObject *args) {
  int fd, max;
  if (!PyArg_ParseTuple(args, "ii", &fd, &max)) return NULL;
  if (max < 1) max = 1;
  if (max > MAX_BATCH) max = MAX_BATCH;
  struct mmsghdr msgs[MAX_BATCH];
  struct iovec iov[MAX_BATCH];
  struct sockaddr_storage from[MAX_BATCH];
  memset(msgs, 0, sizeof(struct mmsghdr) * max);
  for (int i = 0; i < max; i++) {
    iov[i].iov_base = rx_buffers[i];
    iov[i].iov_len = sizeof rx_buffers[i];
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &from[i];
    msgs[i].msg_hdr.msg_namelen = sizeof from[i];
  }
  /* The GIL stays held: the call never blocks (MSG_DONTWAIT), and the shared static
   * buffers are then safe even if several threads used the module. */
  int n = recvmmsg(fd, msgs, max, MSG_DONTWAIT, NULL);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return PyList_New(0);
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  PyObject *out = PyList_New(n);
  if (out == NULL) return NULL;
  for (int i = 0; i < n; i++) {
    /* A datagram longer than 2048 bytes (not WebRTC media, whose packets stay under the
     * path MTU) arrives truncated: it is handed over empty, so the router counts a drop
     * instead of forwarding a cut packet. */
    Py_ssize_t size = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : msgs[i].msg_len;
    PyObject *data = PyBytes_FromStringAndSize(rx_buffers[i], size);
    PyObject *addr = address_tuple(&from[i]);
    if (data == NULL || addr == NULL) {
      Py_XDECREF(data);
      Py_XDECREF(addr);
      Py_DECREF(out);
      return NULL;
    }
    PyObject *item = PyTuple_Pack(2, data, addr);
    Py_DECREF(data);
    Py_DECREF(addr);
    if (item == NULL) {
      Py_DECREF(out);
      return NULL;
    }
    PyList_SET_ITEM(out, i, item);
  }
  return out;
}

static int parse_address(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len) {
  const char *host;
  int port;
  if (!PyArg_ParseTuple(addr, "si", &host, &port)) return -1;
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *sin = (struct sockaddr_in *)ss;
  if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons((unsigned short)port);
    *len = sizeof *sin;
    return 0;
  }
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((unsigned short)port);
    *len = sizeof *sin6;
    return 0;
  }
  PyErr_Format(PyExc_ValueError, "not an IP literal: %s", host);
  return -1;
}

static PyObject *send_batch(PyObject *self, PyObject *args) {
  int fd;
  PyObject *items;
  if (!PyArg_ParseTuple(args, "iO!", &fd, &PyList_Type, &items)) return NULL;
  Py_ssize_t total = PyList_GET_SIZE(items), done = 0;
  struct mmsghdr msgs[MAX_BATCH];
  struct iovec iov[MAX_BATCH];
  struct sockaddr_storage to[MAX_BATCH];
  while (done < total) {
    int n = (int)(total - done < MAX_BATCH ? total - done : MAX_BATCH);
    memset(msgs, 0, sizeof(struct mmsghdr) * n);
    for (int i = 0; i < n; i++) {
      PyObject *item = PyList_GET_ITEM(items, done + i);
      PyObject *data, *addr;
      if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2) {
        PyErr_SetString(PyExc_TypeError, "items must be ((host, port), bytes, ...) tuples");
        return NULL;
      }
      addr = PyTuple_GET_ITEM(item, 0);
      data = PyTuple_GET_ITEM(item, 1);
      char *buffer;
      Py_ssize_t size;
      if (PyBytes_AsStringAndSize(data, &buffer, &size) < 0) return NULL;
      socklen_t len;
      if (parse_address(addr, &to[i], &len) < 0) return NULL;
      iov[i].iov_base = buffer;
      iov[i].iov_len = (size_t)size;
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &to[i];
      msgs[i].msg_hdr.msg_namelen = len;
    }
    int sent = sendmmsg(fd, msgs, n, MSG_DONTWAIT);
    if (sent <= 0) break;
    done += sent;
    if (sent < n) break;
  }
  return PyLong_FromSsize_t(done);
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recvmmsg: up to max (bytes, (host, port))"},
    {"send_batch", send_batch, METH_VARARGS, "sendmmsg of ((host, port), bytes): returns the number sent"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastio", NULL, -1, methods};

PyMODINIT_FUNC PyInit_fastio(void) { return PyModule_Create(&module); }
