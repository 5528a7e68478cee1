/* A socket address as the Python (host, port) tuple socket.recvfrom gives (IPv4 and IPv6,
 * without flowinfo and scope id), for the CPython extensions that hand datagrams up:
 * libs/fastio/native/fastio.c and services/relay/native/relaycore.c. Include after
 * <Python.h>. */
#ifndef VOICEEDGE_FASTIO_ADDRESS_H
#define VOICEEDGE_FASTIO_ADDRESS_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static inline PyObject *address_tuple(const struct sockaddr_storage *ss) {
  char text[INET6_ADDRSTRLEN];
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
    return Py_BuildValue("(si)", text, ntohs(sin->sin_port));
  }
  const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
  inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text);
  return Py_BuildValue("(si)", text, ntohs(sin6->sin6_port));
}

#endif
