/* A stand-in for the kata-deploy image with the pod contract kata-lifecycle-manager relies on
 * (see protocol/src/restart.rs): the upstream chart's DaemonSet runs `/usr/bin/kata-deploy
 * install`, probes GET /healthz and /readyz on $HEALTH_PORT (8090), and from 3.31.0 on Ready
 * means "installed". This one installs nothing: it answers both probes with 200 once started
 * and exits 0 on SIGTERM (the upstream cleanup on stop is out of scope for the real-node
 * test). Each start is logged with the node, so a restart is visible in the pod log. */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "install") != 0) {
        fprintf(stderr, "usage: kata-deploy install (got %s)\n", mode);
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    const char *port_env = getenv("HEALTH_PORT");
    int port = port_env ? atoi(port_env) : 8090;
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(srv, 16) != 0) {
        perror("kata-deploy stand-in: listen");
        return 1;
    }
    const char *node = getenv("NODE_NAME");
    printf("kata-deploy stand-in: installed on %s, serving /healthz and /readyz on :%d\n", node ? node : "?", port);
    fflush(stdout);

    for (;;) {
        int c = accept(srv, NULL, NULL);
        if (c < 0) continue;
        char req[1024];
        ssize_t n = read(c, req, sizeof req - 1);
        req[n > 0 ? n : 0] = '\0';
        int known = strncmp(req, "GET /healthz", 12) == 0 || strncmp(req, "GET /readyz", 11) == 0;
        const char *resp = known ? "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                                 : "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        ssize_t w = write(c, resp, strlen(resp));
        (void)w;
        close(c);
    }
}
