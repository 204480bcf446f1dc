/*
 * loadgen: the harness's own load tool, for what wrk cannot do (no packaged
 * tool loops CONNECT).  One thread, epoll, non-blocking sockets; built by
 * bench/run.py with gcc at bench time.
 *
 *   loadgen MODE PORT [-n NPORTS] [-c CONNS] [-d SECONDS] [-w WARMUP]
 *                     [-s SOURCES] [-a BASIC_TOKEN] [-r RAMP] [-k | -x] [-l]
 *
 * MODE:
 *   connect  CONNECT setups: connect, CONNECT echo.bench:7, wait for the 200,
 *            send 16 bytes, read them back, close; repeat.  Counts setups.
 *   bulk     CONNECT chargen.bench:19 and count the bytes that come back.
 *   http     one absolute-URI GET per connection (Connection: close); counts
 *            responses.  With -k: keep-alive, requests back to back; a
 *            connection the server closes between two responses (tinyproxy
 *            closes after each, without saying so) is opened again and
 *            counted in "reopened", not in "errors".  With
 *            -x: one GET per connection without Connection: close, and the
 *            client closes once the response is in (as curl or a one-shot
 *            Python client does): the proxy sees the client's end first.
 *            With -l: also the latency of every response counted, from the
 *            request's send to the response's last byte (`-c 1 -k -l` is the
 *            harness's latency probe).
 *   hold     open CONNS tunnels to echo.bench:7 (at most RAMP handshakes in
 *            flight), print "ready N" and hold them until stdin closes.
 *
 * New connections go to PORT .. PORT+NPORTS-1 in turn, from source addresses
 * 127.0.0.2 .. 127.0.0.(SOURCES+1) in turn (IP_BIND_ADDRESS_NO_PORT, so the
 * kernel still picks ports per 4-tuple): that spreads TIME_WAIT over many
 * address pairs.  -s 0 leaves the source to the kernel (127.0.0.1).
 *
 * Prints one JSON line: {"mode", "ops", "bytes", "seconds", "rate", "errors",
 * "reopened"}, with -l also "p50_us", "p99_us", "p999_us" and "max_us".
 * Every loop is bounded by the deadline.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum mode { CONNECT, BULK, HTTP, HOLD };
enum state { CONNECTING, HEAD, PING, BODY, IDLE };

struct conn {
    int fd;
    enum state state;
    size_t have;
    long need; /* body bytes still to read (http), -1 unknown */
    double sent; /* when the request went (http, -l) */
    int answered; /* responses complete on this connection (http) */
    char buf[4096];
};

static enum mode mode;
static int base_port, nports = 1, conns = 32, sources = 8, ramp = 200, keepalive, client_closes;
static double seconds = 5, warmup = 1;
static char auth[512];
static char request[1024];
static size_t request_len;
static int epfd;
static unsigned long next_port, next_source;
static unsigned long long ops, bytes, errors, reopened;
static int measuring;
/* -l: one latency per counted response, at most MAX_LATENCIES. */
#define MAX_LATENCIES (1 << 24)
static int latencies_on;
static double *latencies;
static size_t nlatencies, latencies_cap;
static char sink[1 << 20];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void build_request(void) {
    const char *target = mode == BULK ? "chargen.bench:19" : "echo.bench:7";
    if (mode == HTTP)
        request_len = snprintf(request, sizeof request,
                               "GET http://bench.parent/ HTTP/1.1\r\nHost: bench.parent\r\n%s%s\r\n",
                               keepalive || client_closes ? "" : "Connection: close\r\n", auth);
    else
        request_len = snprintf(request, sizeof request,
                               "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", target, target, auth);
}

static int open_conn(struct conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("socket");
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    if (sources > 0) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        sa.sin_addr.s_addr = htonl(0x7f000002 + (next_source++ % sources));
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("bind");
            exit(2);
        }
    }
    sa.sin_addr.s_addr = htonl(0x7f000001);
    sa.sin_port = htons(base_port + (next_port++ % nports));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = CONNECTING;
    c->have = 0;
    c->need = -1;
    c->answered = 0;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void restart(struct conn *c, int failed) {
    if (failed && measuring)
        errors++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (mode == HOLD) {
        if (failed)
            fprintf(stderr, "loadgen: a held tunnel failed\n");
        return;
    }
    if (open_conn(c) < 0 && measuring)
        errors++;
}

static int send_all(struct conn *c, const char *p, size_t n) {
    /* Fresh sockets have far more buffer than these few hundred bytes. */
    if (latencies_on)
        c->sent = now();
    ssize_t sent = send(c->fd, p, n, MSG_NOSIGNAL);
    return sent == (ssize_t)n ? 0 : -1;
}

static void want(struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static unsigned long held;

static void record_latency(double latency) {
    if (nlatencies == latencies_cap) {
        if (latencies_cap == MAX_LATENCIES)
            return;
        latencies_cap = latencies_cap ? latencies_cap * 2 : 1 << 16;
        latencies = realloc(latencies, latencies_cap * sizeof *latencies);
        if (latencies == NULL) {
            perror("realloc");
            exit(2);
        }
    }
    latencies[nlatencies++] = latency;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The q-quantile of the recorded latencies, in microseconds (nearest rank). */
static double quantile_us(double q) {
    size_t rank = (size_t)(q * nlatencies + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > nlatencies)
        rank = nlatencies;
    return latencies[rank - 1] * 1e6;
}

/* Parse a response head in c->buf; returns the head's length or 0 if incomplete, -1 if not 2xx. */
static long head_end(struct conn *c) {
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (end == NULL)
        return c->have == sizeof c->buf ? -1 : 0;
    if (c->have < 12 || c->buf[9] != '2')
        return -1;
    return end - c->buf + 4;
}

static long content_length(struct conn *c, long head) {
    char *p = memmem(c->buf, head, "\r\nContent-Length:", 17);
    if (p == NULL)
        p = memmem(c->buf, head, "\r\ncontent-length:", 17);
    return p == NULL ? -1 : strtol(p + 17, NULL, 10);
}

static void on_event(struct conn *c, unsigned events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
            restart(c, 1);
            return;
        }
        if (send_all(c, request, request_len) < 0) {
            restart(c, 1);
            return;
        }
        c->state = HEAD;
        want(c, EPOLLIN);
        return;
    }
    if (c->state == BODY && mode == BULK) {
        for (int i = 0; i < 16; i++) {
            ssize_t n = recv(c->fd, sink, sizeof sink, 0);
            if (n > 0) {
                if (measuring)
                    bytes += n;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                return;
            restart(c, 1);
            return;
        }
        return;
    }
    ssize_t n = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (keepalive && c->state == HEAD && c->have == 0 && c->answered > 0) {
            /* The server ended a keep-alive connection between responses:
             * as a client would, send the request again on a new one. */
            if (measuring)
                reopened++;
            restart(c, 0);
            return;
        }
        /* An orderly close after a complete one-shot response is the normal end. */
        restart(c, !(c->state == IDLE));
        return;
    }
    c->have += n;
    if (c->state == HEAD) {
        long head = head_end(c);
        if (head == 0)
            return;
        if (head < 0) {
            restart(c, 1);
            return;
        }
        if (mode == CONNECT) {
            c->have = 0;
            if (send_all(c, "0123456789abcdef", 16) < 0) {
                restart(c, 1);
                return;
            }
            c->state = PING;
            return;
        }
        if (mode == HOLD) {
            c->state = IDLE;
            c->have = 0;
            held++;
            return;
        }
        if (mode == BULK) {
            c->state = BODY;
            if (measuring)
                bytes += c->have - head;
            return;
        }
        /* HTTP */
        long length = content_length(c, head);
        if (length < 0) {
            restart(c, 1);
            return;
        }
        c->need = length - (long)(c->have - head);
        c->state = BODY;
        c->have = 0;
    }
    if (c->state == PING) {
        if (c->have < 16)
            return;
        if (measuring)
            ops++;
        restart(c, 0);
        return;
    }
    if (c->state == BODY) { /* HTTP */
        c->need -= (long)c->have;
        c->have = 0;
        if (c->need > 0)
            return;
        if (c->need < 0) {
            restart(c, 1);
            return;
        }
        if (measuring) {
            ops++;
            if (latencies_on)
                record_latency(now() - c->sent);
        }
        c->answered++;
        if (keepalive) {
            c->state = HEAD;
            if (send_all(c, request, request_len) < 0)
                restart(c, 1);
        } else if (client_closes) {
            restart(c, 0);
        } else {
            c->state = IDLE; /* wait for the server's close */
        }
        return;
    }
    if (c->state == IDLE && mode == HTTP) {
        /* Bytes after a complete Connection: close response. */
        restart(c, 1);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen connect|bulk|http|hold PORT [-n NPORTS] [-c CONNS] "
                    "[-d SECONDS] [-w WARMUP] [-s SOURCES] [-a TOKEN] [-r RAMP] [-k | -x] [-l]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 3)
        usage();
    if (!strcmp(argv[1], "connect"))
        mode = CONNECT;
    else if (!strcmp(argv[1], "bulk"))
        mode = BULK;
    else if (!strcmp(argv[1], "http"))
        mode = HTTP;
    else if (!strcmp(argv[1], "hold"))
        mode = HOLD;
    else
        usage();
    base_port = atoi(argv[2]);
    for (int i = 3; i < argc; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "-k")) {
            keepalive = 1;
            continue;
        }
        if (!strcmp(opt, "-x")) {
            client_closes = 1;
            continue;
        }
        if (!strcmp(opt, "-l")) {
            latencies_on = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *val = argv[++i];
        if (!strcmp(opt, "-n"))
            nports = atoi(val);
        else if (!strcmp(opt, "-c"))
            conns = atoi(val);
        else if (!strcmp(opt, "-d"))
            seconds = atof(val);
        else if (!strcmp(opt, "-w"))
            warmup = atof(val);
        else if (!strcmp(opt, "-s"))
            sources = atoi(val);
        else if (!strcmp(opt, "-r"))
            ramp = atoi(val);
        else if (!strcmp(opt, "-a"))
            snprintf(auth, sizeof auth, "Proxy-Authorization: Basic %s\r\n", val);
        else
            usage();
    }
    if (nports < 1 || conns < 1 || conns > 100000 || seconds <= 0 || ramp < 1)
        usage();
    build_request();
    epfd = epoll_create1(0);
    struct conn *all = calloc(conns, sizeof *all);
    struct epoll_event events[256];

    if (mode == HOLD) {
        /* Ramp: at most `ramp` handshakes in flight; give up after `seconds`. */
        int opened = 0;
        double deadline = now() + seconds;
        while (held < (unsigned long)conns && now() < deadline) {
            while (opened < conns && opened - (long)held < ramp) {
                if (open_conn(&all[opened]) < 0) {
                    fprintf(stderr, "loadgen: connect failed\n");
                    break;
                }
                opened++;
            }
            int n = epoll_wait(epfd, events, 256, 100);
            for (int i = 0; i < n; i++)
                on_event(events[i].data.ptr, events[i].events);
        }
        printf("ready %lu\n", held);
        fflush(stdout);
        /* Hold until stdin closes (the harness's signal), serving nothing. */
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        char tmp[64];
        while (poll(&pfd, 1, -1) >= 0 && read(0, tmp, sizeof tmp) > 0)
            ;
        return held == (unsigned long)conns ? 0 : 1;
    }

    /* Ramp the first connections in over ~100 ms rather than one SYN burst. */
    double start = now();
    for (int i = 0; i < conns; i++) {
        if (open_conn(&all[i]) < 0)
            errors++;
        if (i % 64 == 63) {
            int n = epoll_wait(epfd, events, 256, 1);
            for (int j = 0; j < n; j++)
                on_event(events[j].data.ptr, events[j].events);
        }
    }
    double begin = start + warmup, end = begin + seconds;
    for (;;) {
        double t = now();
        if (!measuring && t >= begin) {
            measuring = 1;
            begin = t;
            end = t + seconds;
        }
        if (measuring && t >= end)
            break;
        int n = epoll_wait(epfd, events, 256, 10);
        for (int i = 0; i < n; i++)
            on_event(events[i].data.ptr, events[i].events);
    }
    double elapsed = now() - begin;
    double rate = (mode == BULK ? bytes : ops) / elapsed;
    printf("{\"mode\": \"%s\", \"ops\": %llu, \"bytes\": %llu, \"seconds\": %.3f, "
           "\"rate\": %.1f, \"errors\": %llu, \"reopened\": %llu",
           argv[1], ops, bytes, elapsed, rate, errors, reopened);
    if (latencies_on && nlatencies > 0) {
        qsort(latencies, nlatencies, sizeof *latencies, by_value);
        printf(", \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f",
               quantile_us(0.5), quantile_us(0.99), quantile_us(0.999),
               latencies[nlatencies - 1] * 1e6);
    }
    printf("}\n");
    return 0;
}
