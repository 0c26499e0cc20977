/* The compiled load generator: what bench/loadgen.py does, in C, so that the load generator
 * is not the limit of a capacity measurement (about 2 us of CPU per frame against about
 * 15 us for the Python one).
 *
 *   cc -O2 -o loadgen bench/loadgen.c
 *   ./loadgen HOST PORT PATH CALLS SECONDS TRACKS FIRST
 *
 * Each call does a WebSocket handshake, sends Twilio's `connected` and `start`, then one
 * 160-byte mu-law `media` frame every 20 ms per track (TRACKS 1: inbound; 2: inbound and
 * outbound) for SECONDS, then `stop` and a close. Calls are spread evenly over the 20 ms
 * period in 20 slots. Each payload starts with the sender's CLOCK_MONOTONIC nanoseconds
 * (Python's time.monotonic_ns() on Linux), so that the server can measure
 * receive-to-handler latency. Frames are masked with the all-zero key (RFC 6455 allows it).
 * The server's pings are answered (pongs echo their payload), so that a server with
 * keepalive on keeps the calls. Prints a JSON line once every call is connected and
 * started, and one at the end: calls, failed, frames sent, the sender's own lateness. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 20
#define PERIOD_NS 20000000LL
#define PAYLOAD 160
#define INBUF 8192

typedef struct {
    int fd;
    int alive;
    long sequence;
    long chunk;
    size_t have; /* bytes of a server frame in inbuf */
    unsigned char inbuf[INBUF];
    char sid[35];
} call_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t b64(const unsigned char *in, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = B64[(v >> 18) & 63];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    return o;
}

/* A masked client frame with the all-zero key; returns its length. */
static size_t frame(unsigned char opcode, const char *text, size_t n, unsigned char *out) {
    size_t h = 0;
    out[h++] = 0x80 | opcode;
    if (n < 126) {
        out[h++] = 0x80 | (unsigned char)n;
    } else {
        out[h++] = 0x80 | 126;
        out[h++] = (unsigned char)(n >> 8);
        out[h++] = (unsigned char)n;
    }
    memset(out + h, 0, 4);
    h += 4;
    memcpy(out + h, text, n);
    return h + n;
}

static int send_all(int fd, const unsigned char *data, size_t n) {
    while (n) {
        ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { /* the server is behind: wait for room */
                usleep(100);
                continue;
            }
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_text(call_t *c, const char *text) {
    unsigned char buf[4096];
    size_t n = frame(0x1, text, strlen(text), buf);
    return send_all(c->fd, buf, n);
}

static int connect_call(const struct sockaddr_in *addr, const char *host, int port,
                        const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        close(fd);
        return -1;
    }
    char request[1024];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", path, host, port);
    if (send_all(fd, (unsigned char *)request, (size_t)n) < 0) {
        close(fd);
        return -1;
    }
    char response[4096];
    size_t have = 0;
    /* Read the response head byte by byte: nothing of the stream may be consumed. */
    while (have < sizeof response - 1) {
        ssize_t r = recv(fd, response + have, 1, 0);
        if (r <= 0) {
            close(fd);
            return -1;
        }
        have++;
        if (have >= 4 && memcmp(response + have - 4, "\r\n\r\n", 4) == 0) break;
    }
    response[have] = 0;
    if (strncmp(response, "HTTP/1.1 101", 12) != 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Reads what the server sent; answers pings. Returns -1 when the server closed. */
static int drain(call_t *c) {
    for (;;) {
        ssize_t r = recv(c->fd, c->inbuf + c->have, INBUF - c->have, MSG_DONTWAIT);
        if (r == 0) return -1;
        if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->have += (size_t)r;
        for (;;) {
            if (c->have < 2) break;
            unsigned char op = c->inbuf[0] & 0x0f;
            size_t len = c->inbuf[1] & 0x7f, head = 2;
            if (len == 126) {
                if (c->have < 4) break;
                len = ((size_t)c->inbuf[2] << 8) | c->inbuf[3];
                head = 4;
            } else if (len == 127) {
                return -1; /* nothing the service sends this bench is that large */
            }
            if (head + len > INBUF) return -1;
            if (c->have < head + len) break;
            if (op == 0x9) { /* ping: pong with its payload */
                unsigned char pong[256];
                if (len <= 125) {
                    size_t n = frame(0xA, (const char *)c->inbuf + head, len, pong);
                    if (send_all(c->fd, pong, n) < 0) return -1;
                }
            } else if (op == 0x8) {
                return -1;
            }
            memmove(c->inbuf, c->inbuf + head + len, c->have - head - len);
            c->have -= head + len;
        }
    }
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT PATH CALLS SECONDS TRACKS FIRST\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *path = argv[3];
    int port = atoi(argv[2]), calls = atoi(argv[4]), tracks = atoi(argv[6]);
    double seconds = atof(argv[5]);
    long first = atol(argv[7]);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        struct hostent *h = gethostbyname(host);
        if (!h) return 2;
        memcpy(&addr.sin_addr, h->h_addr_list[0], sizeof addr.sin_addr);
    }
    call_t *all = calloc((size_t)calls, sizeof *all);
    int connected = 0, failed = 0;
    int ep = epoll_create1(0);
    for (int i = 0; i < calls; i++) {
        call_t *c = &all[i];
        snprintf(c->sid, sizeof c->sid, "MZ%032lx", first + i);
        c->fd = connect_call(&addr, host, port, path);
        if (c->fd < 0) {
            failed++;
            continue;
        }
        char start[1024];
        snprintf(start, sizeof start,
                 "{\"event\":\"start\",\"sequenceNumber\":\"1\",\"streamSid\":\"%s\","
                 "\"start\":{\"accountSid\":\"AC00000000000000000000000000000000\","
                 "\"streamSid\":\"%s\",\"callSid\":\"CA%s\",\"tracks\":[%s],"
                 "\"customParameters\":{\"bench\":\"1\"},\"mediaFormat\":{\"encoding\":"
                 "\"audio/x-mulaw\",\"sampleRate\":8000,\"channels\":1}}}",
                 c->sid, c->sid, c->sid + 2,
                 tracks == 2 ? "\"inbound\",\"outbound\"" : "\"inbound\"");
        if (send_text(c, "{\"event\":\"connected\",\"protocol\":\"Call\",\"version\":\"1.0.0\"}")
                < 0 || send_text(c, start) < 0) {
            close(c->fd);
            failed++;
            continue;
        }
        c->alive = 1;
        c->sequence = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        connected++;
    }
    printf("{\"connected\": %d}\n", connected);
    fflush(stdout);

    long periods = (long)(seconds * 1000 / 20 + 0.5);
    size_t late_n = 0, late_cap = (size_t)periods * SLOTS + 1;
    double *lateness = malloc(late_cap * sizeof *lateness);
    long sent = 0;
    unsigned char raw[PAYLOAD] = {0};
    char text[512], b[256];
    unsigned char out[2 * 600];
    struct epoll_event events[256];
    int64_t started = now_ns();
    for (long period = 0; period < periods; period++) {
        for (int slot = 0; slot < SLOTS; slot++) {
            int64_t due = started + period * PERIOD_NS + (int64_t)slot * PERIOD_NS / SLOTS;
            struct timespec ts = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
            int64_t late = now_ns() - due;
            lateness[late_n++] = late > 0 ? late / 1e6 : 0.0;
            for (int i = slot; i < calls; i += SLOTS) {
                call_t *c = &all[i];
                if (!c->alive) continue;
                c->chunk++;
                size_t n = 0;
                for (int t = 0; t < tracks; t++) {
                    int64_t stamp = now_ns();
                    memcpy(raw, &stamp, 8); /* little-endian, as the handler reads it */
                    size_t bn = b64(raw, PAYLOAD, b);
                    b[bn] = 0;
                    c->sequence++;
                    int tn = snprintf(text, sizeof text,
                        "{\"event\":\"media\",\"sequenceNumber\":\"%ld\",\"media\":{\"track\":"
                        "\"%s\",\"chunk\":\"%ld\",\"timestamp\":\"%ld\",\"payload\":\"%s\"},"
                        "\"streamSid\":\"%s\"}", c->sequence, t ? "outbound" : "inbound",
                        c->chunk, 99 + (c->chunk - 1) * 20, b, c->sid);
                    n += frame(0x1, text, (size_t)tn, out + n);
                }
                if (send_all(c->fd, out, n) < 0) {
                    c->alive = 0;
                    failed++;
                    continue;
                }
                sent += tracks;
            }
            int ready = epoll_wait(ep, events, 256, 0);
            for (int e = 0; e < ready; e++) {
                call_t *c = events[e].data.ptr;
                if (c->alive && drain(c) < 0) {
                    c->alive = 0;
                    failed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                }
            }
        }
    }
    for (int i = 0; i < calls; i++) {
        call_t *c = &all[i];
        if (c->fd < 0) continue;
        if (c->alive) {
            snprintf(text, sizeof text,
                     "{\"event\":\"stop\",\"sequenceNumber\":\"%ld\",\"streamSid\":\"%s\","
                     "\"stop\":{}}", c->sequence + 1, c->sid);
            send_text(c, text);
            static const unsigned char bye[] = {0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8};
            send_all(c->fd, bye, sizeof bye);
        }
        close(c->fd);
    }
    qsort(lateness, late_n, sizeof *lateness, compare);
    double p50 = late_n ? lateness[late_n / 2] : 0, p99 = late_n ? lateness[late_n * 99 / 100] : 0;
    printf("{\"calls\": %d, \"failed\": %d, \"frames_sent\": %ld, "
           "\"sender_lateness_ms\": {\"p50\": %.3f, \"p99\": %.3f}}\n",
           connected, failed, sent, p50, p99);
    return 0;
}
