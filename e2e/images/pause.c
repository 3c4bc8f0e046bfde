/*
 * twinvol's pod sandbox ("pause") program for the test cluster's image
 * twinvol.local/pause:1 (built by e2e/src/cluster/images.rs with
 * `gcc -static -Os`).
 *
 * It holds the pod's namespaces open and does nothing else: it sleeps until
 * a signal arrives, exits on SIGINT or SIGTERM, and, being PID 1 of the pod
 * when the pod shares its PID namespace, reaps every child handed to it.
 */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
	(void)sig;
	_exit(0);
}

static void reap(int sig) {
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0) {
	}
}

int main(void) {
	struct sigaction on_stop = {0}, on_child = {0};
	on_stop.sa_handler = stop;
	on_child.sa_handler = reap;
	on_child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	if (sigaction(SIGINT, &on_stop, NULL) < 0 || sigaction(SIGTERM, &on_stop, NULL) < 0 ||
	    sigaction(SIGCHLD, &on_child, NULL) < 0) {
		return 1;
	}
	for (;;) {
		pause();
	}
}
