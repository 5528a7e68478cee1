/* Flood generator and probe for //tests/bench:relay_flood (issue 18): fast enough that the
 * flooding host, not the generator, is what a 100k+ pps row measures (a Python sender peaks
 * near 20k pps here).
 *
 *   floodgen flood DEST_IP DEST_PORT PPS SECONDS KIND USERNAME [SPOOF_CIDR]
 *     KIND random: random bytes, 20-200 long, any first byte
 *          forged: STUN Binding requests carrying USERNAME, a random MESSAGE-INTEGRITY and
 *                  a fresh transaction id each
 *          dtls:   DTLS-looking records (first byte 20-63, RFC 7983) from unbound sources
 *     PPS 0: as fast as this host can. Without SPOOF_CIDR the datagrams leave from 64 UDP
 *     sockets of this host; with it (e.g. 10.77.0.0/16) from a raw socket, each from a random
 *     address and port inside that prefix (UDP checksum 0: none, RFC 768).
 *     Prints one line: sent=N errors=N seconds=S
 *   floodgen probe-send DEST_IP DEST_PORT PPS SECONDS
 *     A paced stream of probe datagrams ("VEPROBE!", sequence number): what a plain forwarder
 *     carries beside the flood, the reference for a call's longest gap.
 *   floodgen probe-sink LISTEN_IP LISTEN_PORT SECONDS
 *     Receives for SECONDS; prints probes=N lost=N longest_gap_ms=X other=N (other: datagrams
 *     that were not probes, i.e. flood the forwarder passed on). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define POOL 4096
#define SOCKETS 64
#define MAX_DGRAM 256
#define IP_UDP_HEADERS 28
static const char PROBE_MAGIC[8] = {'V', 'E', 'P', 'R', 'O', 'B', 'E', '!'};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_random(void) { /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1Dull;
}

static void fill_random(uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = (uint8_t)next_random();
}

static size_t put_attribute(uint8_t *p, uint16_t kind, const uint8_t *value, size_t len) {
  p[0] = (uint8_t)(kind >> 8);
  p[1] = (uint8_t)kind;
  p[2] = (uint8_t)(len >> 8);
  p[3] = (uint8_t)len;
  memcpy(p + 4, value, len);
  size_t padded = (len + 3) & ~(size_t)3;
  memset(p + 4 + len, 0, padded - len);
  return 4 + padded;
}

/* One datagram of KIND into p (at most MAX_DGRAM bytes); returns its length. */
static size_t make_datagram(uint8_t *p, const char *kind, const char *username) {
  if (strcmp(kind, "forged") == 0) {
    uint8_t integrity[20];
    fill_random(integrity, sizeof integrity);
    size_t n = 20;
    size_t ulen = strlen(username);
    if (ulen > 128) ulen = 128;
    n += put_attribute(p + n, 0x0006, (const uint8_t *)username, ulen); /* USERNAME */
    n += put_attribute(p + n, 0x0008, integrity, sizeof integrity);     /* MESSAGE-INTEGRITY */
    p[0] = 0x00;
    p[1] = 0x01; /* Binding request */
    p[2] = (uint8_t)((n - 20) >> 8);
    p[3] = (uint8_t)(n - 20);
    p[4] = 0x21;
    p[5] = 0x12;
    p[6] = 0xA4;
    p[7] = 0x42;
    fill_random(p + 8, 12);
    return n;
  }
  size_t n = 20 + next_random() % 181;
  fill_random(p, n);
  if (strcmp(kind, "dtls") == 0) {
    p[0] = (uint8_t)(20 + next_random() % 44); /* 20-63: DTLS (RFC 7983 §7) */
    p[1] = 0xFE;
    p[2] = 0xFD; /* DTLS 1.2 */
  }
  return n;
}

static int parse_cidr(const char *text, uint32_t *base, uint32_t *mask) {
  char addr[32];
  const char *slash = strchr(text, '/');
  if (slash == NULL || (size_t)(slash - text) >= sizeof addr) return -1;
  memcpy(addr, text, (size_t)(slash - text));
  addr[slash - text] = 0;
  struct in_addr in;
  int bits = atoi(slash + 1);
  if (inet_pton(AF_INET, addr, &in) != 1 || bits < 8 || bits > 32) return -1;
  *mask = bits == 32 ? 0xFFFFFFFFu : ~(0xFFFFFFFFu >> bits);
  *base = ntohl(in.s_addr) & *mask;
  return 0;
}

/* Sends PPS (0: unthrottled) for SECONDS: `send_batch(count)` sends `count` datagrams and
 * returns how many left. Each round sends what is due (at most BATCH), so a nap that
 * oversleeps on a loaded machine is made up at once instead of lowering the rate. */
typedef int (*send_fn)(int count);

static uint64_t pace(double rate, double seconds, send_fn send_batch, uint64_t *errors) {
  const uint64_t start = now_ns(), stop = start + (uint64_t)(seconds * 1e9);
  const struct timespec nap = {0, 20000};
  uint64_t sent = 0;
  for (uint64_t t = start; t < stop; t = now_ns()) {
    int count = BATCH;
    if (rate > 0) {
      double due = (double)(t - start) * rate / 1e9 - (double)sent;
      if (due < 1) {
        nanosleep(&nap, NULL);
        continue;
      }
      if (due < BATCH) count = (int)due;
    }
    int k = send_batch(count);
    sent += (uint64_t)count; /* failed sends are counted apart, never retried */
    if (k < count) *errors += (uint64_t)(count - (k > 0 ? k : 0));
  }
  return sent - *errors;
}

static uint8_t pool[POOL][MAX_DGRAM + IP_UDP_HEADERS];
static size_t pool_len[POOL];
static int forged;
static int fds[SOCKETS];
static int raw_fd;
static struct sockaddr_in dest;
static uint32_t spoof_base, spoof_mask;
static uint64_t cursor;
static struct mmsghdr msgs[BATCH];
static struct iovec iovs[BATCH];

static void refresh(uint8_t *p) {
  if (forged) fill_random(p + 8, 12); /* a fresh transaction id: no replay detection */
}

static int send_plain(int count) {
  for (int i = 0; i < count; i++) {
    size_t at = (cursor + (uint64_t)i) % POOL;
    uint8_t *p = pool[at] + IP_UDP_HEADERS;
    refresh(p);
    iovs[i].iov_base = p;
    iovs[i].iov_len = pool_len[at];
  }
  int k = sendmmsg(fds[(cursor / BATCH) % SOCKETS], msgs, (unsigned)count, 0);
  cursor += (uint64_t)count;
  return k;
}

static int send_spoofed(int count) {
  for (int i = 0; i < count; i++) {
    size_t at = (cursor + (uint64_t)i) % POOL;
    uint8_t *p = pool[at];
    refresh(p + IP_UDP_HEADERS);
    size_t total = pool_len[at] + IP_UDP_HEADERS;
    uint64_t r = next_random();
    uint32_t source = spoof_base | ((uint32_t)r & ~spoof_mask);
    uint16_t sport = (uint16_t)(1024 + (r >> 32) % 64000);
    struct iphdr *ip = (struct iphdr *)p;
    memset(ip, 0, sizeof *ip);
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->tot_len = htons((uint16_t)total);
    ip->saddr = htonl(source);
    ip->daddr = dest.sin_addr.s_addr; /* checksum and id: filled in by the kernel */
    uint8_t *udp = p + 20;
    udp[0] = (uint8_t)(sport >> 8);
    udp[1] = (uint8_t)sport;
    memcpy(udp + 2, &dest.sin_port, 2);
    udp[4] = (uint8_t)((total - 20) >> 8);
    udp[5] = (uint8_t)(total - 20);
    udp[6] = udp[7] = 0; /* no checksum */
    iovs[i].iov_base = p;
    iovs[i].iov_len = total;
  }
  int k = sendmmsg(raw_fd, msgs, (unsigned)count, 0);
  cursor += (uint64_t)count;
  return k;
}

static int flood(int argc, char **argv) {
  if (argc != 8 && argc != 9) return 2;
  memset(&dest, 0, sizeof dest);
  dest.sin_family = AF_INET;
  dest.sin_port = htons((uint16_t)atoi(argv[3]));
  if (inet_pton(AF_INET, argv[2], &dest.sin_addr) != 1) return 2;
  double rate = atof(argv[4]), seconds = atof(argv[5]);
  const char *kind = argv[6], *username = argv[7];
  if (strcmp(kind, "random") && strcmp(kind, "forged") && strcmp(kind, "dtls")) return 2;
  forged = strcmp(kind, "forged") == 0;
  rng_state ^= (uint64_t)getpid() << 17;
  for (int i = 0; i < POOL; i++)
    pool_len[i] = make_datagram(pool[i] + IP_UDP_HEADERS, kind, username);
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    msgs[i].msg_hdr.msg_iov = &iovs[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &dest;
    msgs[i].msg_hdr.msg_namelen = sizeof dest;
  }
  send_fn send_batch;
  if (argc == 9) {
    if (parse_cidr(argv[8], &spoof_base, &spoof_mask) < 0) return 2;
    raw_fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW); /* IP_HDRINCL implied */
    if (raw_fd < 0) {
      perror("raw socket (needs root)");
      return 1;
    }
    send_batch = send_spoofed;
  } else {
    for (int i = 0; i < SOCKETS; i++) {
      fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
      if (fds[i] < 0) {
        perror("socket");
        return 1;
      }
    }
    send_batch = send_plain;
  }
  uint64_t errors = 0, start = now_ns();
  uint64_t sent = pace(rate, seconds, send_batch, &errors);
  printf("sent=%llu errors=%llu seconds=%.3f\n", (unsigned long long)sent,
         (unsigned long long)errors, (double)(now_ns() - start) / 1e9);
  return 0;
}

static int probe_send(int argc, char **argv) {
  if (argc != 6) return 2;
  memset(&dest, 0, sizeof dest);
  dest.sin_family = AF_INET;
  dest.sin_port = htons((uint16_t)atoi(argv[3]));
  if (inet_pton(AF_INET, argv[2], &dest.sin_addr) != 1) return 2;
  double rate = atof(argv[4]), seconds = atof(argv[5]);
  if (rate <= 0) return 2;
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  uint8_t data[160];
  memset(data, 0, sizeof data);
  data[0] = 0x80; /* SRTP class, like the media it stands for */
  memcpy(data + 1, PROBE_MAGIC, sizeof PROBE_MAGIC);
  uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), seq = 0;
  while (now_ns() < end) {
    memcpy(data + 9, &seq, 8);
    sendto(fd, data, sizeof data, 0, (struct sockaddr *)&dest, sizeof dest);
    seq++;
    uint64_t due = start + (uint64_t)((double)seq * 1e9 / rate);
    uint64_t t = now_ns();
    if (due > t) {
      struct timespec pause = {(time_t)((due - t) / 1000000000ull), (long)((due - t) % 1000000000ull)};
      nanosleep(&pause, NULL);
    }
  }
  printf("sent=%llu\n", (unsigned long long)seq);
  return 0;
}

static int probe_sink(int argc, char **argv) {
  if (argc != 5) return 2;
  struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3]))};
  if (inet_pton(AF_INET, argv[2], &me.sin_addr) != 1) return 2;
  double seconds = atof(argv[4]);
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  int buf = 8 << 20;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  if (bind(fd, (struct sockaddr *)&me, sizeof me) != 0) {
    perror("bind");
    return 1;
  }
  struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  printf("ready\n");
  fflush(stdout);
  static uint8_t data[BATCH][2048];
  struct iovec iov[BATCH];
  struct mmsghdr in[BATCH];
  memset(in, 0, sizeof in);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = data[i];
    iov[i].iov_len = sizeof data[i];
    in[i].msg_hdr.msg_iov = &iov[i];
    in[i].msg_hdr.msg_iovlen = 1;
  }
  uint64_t end = now_ns() + (uint64_t)(seconds * 1e9), probes = 0, other = 0;
  uint64_t last = 0, longest = 0, low = UINT64_MAX, high = 0;
  while (now_ns() < end) {
    int n = recvmmsg(fd, in, BATCH, MSG_WAITFORONE, NULL);
    if (n <= 0) continue;
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) {
      if (in[i].msg_len < 17 || memcmp(data[i] + 1, PROBE_MAGIC, sizeof PROBE_MAGIC) != 0) {
        other++;
        continue;
      }
      uint64_t seq;
      memcpy(&seq, data[i] + 9, 8);
      if (seq < low) low = seq;
      if (seq > high) high = seq;
      if (probes && t - last > longest) longest = t - last;
      last = t;
      probes++;
    }
  }
  uint64_t expected = probes ? high - low + 1 : 0;
  printf("probes=%llu lost=%llu longest_gap_ms=%.1f other=%llu\n", (unsigned long long)probes,
         (unsigned long long)(expected > probes ? expected - probes : 0), (double)longest / 1e6,
         (unsigned long long)other);
  return 0;
}

int main(int argc, char **argv) {
  int rc = 2;
  if (argc >= 2 && strcmp(argv[1], "flood") == 0) rc = flood(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "probe-send") == 0) rc = probe_send(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "probe-sink") == 0) rc = probe_sink(argc, argv);
  if (rc == 2)
    fprintf(stderr,
            "usage: %s flood DEST_IP DEST_PORT PPS SECONDS random|forged|dtls USERNAME "
            "[SPOOF_CIDR]\n       %s probe-send DEST_IP DEST_PORT PPS SECONDS\n"
            "       %s probe-sink LISTEN_IP LISTEN_PORT SECONDS\n",
            argv[0], argv[0], argv[0]);
  return rc;
}
