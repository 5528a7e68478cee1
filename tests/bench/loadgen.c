/* Load generator and sink for //tests/bench:relay, so the measuring side is never the
 * bottleneck. Sends SIZE-byte SRTP-class packets round-robin from already-bound client
 * sockets (inherited fds) to TARGET at RATE pps (0: as fast as possible) for DURATION
 * seconds; a second thread receives on the inherited sink fd. Each packet ends with
 * [u64 sequence][u64 send time, CLOCK_MONOTONIC ns], so the sink measures one-way latency
 * whatever header the forwarder prepends.
 *
 * usage: loadgen TARGET_PORT RATE DURATION_S SIZE SINK_FD FD[,FD...]
 * Prints one line: sent=N received=N p50_us=X p99_us=X */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define MAX_CLIENTS 256
#define MAX_SAMPLES 4000000

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int sink_fd;
static volatile int stop_rx;
static uint64_t received;
static uint64_t *samples;
static uint64_t n_samples;

static void *rx(void *arg) {
  (void)arg;
  static char data[BATCH][2048];
  struct iovec iov[BATCH];
  struct mmsghdr msgs[BATCH];
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = data[i];
    iov[i].iov_len = sizeof data[i];
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
  setsockopt(sink_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  while (!stop_rx) {
    int n = recvmmsg(sink_fd, msgs, BATCH, MSG_WAITFORONE, NULL);
    if (n <= 0) continue;
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) {
      unsigned len = msgs[i].msg_len;
      if (len < 16) continue;
      uint64_t sent_at;
      memcpy(&sent_at, data[i] + len - 8, 8);
      received++;
      if (n_samples < MAX_SAMPLES && t >= sent_at) samples[n_samples++] = t - sent_at;
    }
  }
  return NULL;
}

static int cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s TARGET_PORT RATE DURATION_S SIZE SINK_FD FDS\n", argv[0]);
    return 2;
  }
  struct sockaddr_in target = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  inet_pton(AF_INET, "127.0.0.1", &target.sin_addr);
  double rate = atof(argv[2]), duration = atof(argv[3]);
  int size = atoi(argv[4]);
  if (size < 20 || size > 1400) size = 200;
  sink_fd = atoi(argv[5]);
  int fds[MAX_CLIENTS], n_fds = 0;
  for (char *tok = strtok(argv[6], ","); tok && n_fds < MAX_CLIENTS; tok = strtok(NULL, ","))
    fds[n_fds++] = atoi(tok);
  if (n_fds == 0) return 2;
  samples = malloc(sizeof(uint64_t) * MAX_SAMPLES);
  pthread_t thread;
  pthread_create(&thread, NULL, rx, NULL);

  static char data[BATCH][1500];
  struct iovec iov[BATCH];
  struct mmsghdr msgs[BATCH];
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    memset(data[i], 0, size);
    data[i][0] = (char)0x80; /* RTP version 2: SRTP class (RFC 7983) */
    data[i][1] = 0x6f;
    iov[i].iov_base = data[i];
    iov[i].iov_len = size;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &target;
    msgs[i].msg_hdr.msg_namelen = sizeof target;
  }
  uint64_t start = now_ns(), end = start + (uint64_t)(duration * 1e9), sent = 0, seq = 0;
  int batch = rate > 0 && rate < 20000 ? 1 : (rate > 0 && rate < 100000 ? 4 : BATCH);
  int client = 0;
  for (;;) {
    uint64_t t = now_ns();
    if (t >= end) break;
    if (rate > 0) {
      double due = (double)(t - start) * rate / 1e9;
      if ((double)sent + batch > due) {
        struct timespec pause = {0, 20000};
        if ((double)sent + batch - due > rate * 0.0002) nanosleep(&pause, NULL);
        continue;
      }
    }
    for (int i = 0; i < batch; i++) {
      uint64_t stamp = now_ns();
      seq++;
      memcpy(data[i] + size - 16, &seq, 8);
      memcpy(data[i] + size - 8, &stamp, 8);
    }
    int k = sendmmsg(fds[client], msgs, batch, 0);
    if (k > 0) sent += k;
    client = (client + 1) % n_fds;
  }
  struct timespec grace = {1, 0}; /* late packets still count: stalls are not loss */
  nanosleep(&grace, NULL);
  stop_rx = 1;
  pthread_join(thread, NULL);
  double p50 = 0, p99 = 0;
  if (n_samples) {
    qsort(samples, n_samples, sizeof(uint64_t), cmp);
    p50 = samples[n_samples / 2] / 1000.0;
    p99 = samples[(n_samples * 99) / 100] / 1000.0;
  }
  printf("sent=%llu received=%llu p50_us=%.1f p99_us=%.1f\n", (unsigned long long)sent,
         (unsigned long long)received, p50, p99);
  return 0;
}
