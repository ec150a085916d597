/* The node's sandbox ("pause") image: PID 1 of every pod sandbox, holding its namespaces.
 * containerd's CRI plugin needs one and none can be pulled here, so the real node builds its
 * own (tests/images/build.sh). It sleeps until told to stop and reaps orphans, as the
 * upstream pause does; written from its documented behaviour, not its source. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(128 + sig); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = stop;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    for (;;) pause();
}
