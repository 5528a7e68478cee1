/* Reference UDP forwarder for //tests/bench:relay: what a tight native loop achieves on one
 * core. Everything received on the listen port goes, unchanged (no framing), to one fixed
 * destination, in batches with recvmmsg/sendmmsg.
 *
 * usage: ref_forwarder LISTEN_PORT DEST_PORT [LISTEN_IP DEST_IP]   (default 127.0.0.1; the
 * flood benchmark runs it on a testbed host)
 * Prints "ready <port>" once bound; runs until killed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define MAXLEN 2048

int main(int argc, char **argv) {
  if (argc != 3 && argc != 5) {
    fprintf(stderr, "usage: %s LISTEN_PORT DEST_PORT [LISTEN_IP DEST_IP]\n", argv[0]);
    return 2;
  }
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  int buf = 4 << 20; /* same buffers as the relay: *FORCE when root, else capped */
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) != 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  inet_pton(AF_INET, argc == 5 ? argv[3] : "127.0.0.1", &me.sin_addr);
  if (bind(fd, (struct sockaddr *)&me, sizeof me) != 0) {
    perror("bind");
    return 1;
  }
  socklen_t len = sizeof me;
  getsockname(fd, (struct sockaddr *)&me, &len);
  printf("ready %d\n", ntohs(me.sin_port));
  fflush(stdout);
  struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  inet_pton(AF_INET, argc == 5 ? argv[4] : "127.0.0.1", &dest.sin_addr);

  static char data[BATCH][MAXLEN];
  struct iovec iov[BATCH];
  struct mmsghdr in[BATCH], out[BATCH];
  memset(in, 0, sizeof in);
  memset(out, 0, sizeof out);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = data[i];
    iov[i].iov_len = MAXLEN;
    in[i].msg_hdr.msg_iov = &iov[i];
    in[i].msg_hdr.msg_iovlen = 1;
    out[i].msg_hdr.msg_iov = &iov[i];
    out[i].msg_hdr.msg_iovlen = 1;
    out[i].msg_hdr.msg_name = &dest;
    out[i].msg_hdr.msg_namelen = sizeof dest;
  }
  for (;;) {
    int n = recvmmsg(fd, in, BATCH, MSG_WAITFORONE, NULL);
    if (n <= 0) continue;
    for (int i = 0; i < n; i++) iov[i].iov_len = in[i].msg_len;
    int sent = 0;
    while (sent < n) {
      int k = sendmmsg(fd, out + sent, n - sent, 0);
      if (k <= 0) break;
      sent += k;
    }
    for (int i = 0; i < n; i++) iov[i].iov_len = MAXLEN;
  }
}
