/* The verification pod's image for the real-node test: `verify pass [SECONDS]` exits 0,
 * `verify fail [SECONDS]` exits 1, after SECONDS (default 0: a verification in progress for a
 * test to act during) and a line naming the node ($NODE_NAME), so the agent's evidence (log
 * tail, exit code) can be checked from outside. A real container run by runc, not a simulated
 * one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *node = getenv("NODE_NAME");
    const char *verdict = argc > 1 ? argv[1] : "";
    if (argc > 2) sleep((unsigned)atoi(argv[2]));
    if (strcmp(verdict, "pass") == 0) {
        printf("verification passed on %s\n", node ? node : "?");
        return 0;
    }
    if (strcmp(verdict, "fail") == 0) {
        printf("verification failed on %s: kata runtime check failed (test scenario)\n", node ? node : "?");
        return 1;
    }
    fprintf(stderr, "usage: verify pass|fail\n");
    return 2;
}
