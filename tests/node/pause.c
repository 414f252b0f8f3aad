/* The pod sandbox's process: holds the pod's namespaces until told to stop. */
#include <signal.h>
#include <unistd.h>

static void quit(int sig) {
  (void)sig;
  _exit(0);
}

int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  for (;;) pause();
}
