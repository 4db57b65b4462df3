/* dead.c: rosterctl dead (being written). */
#include "ctl.h"

int ctl_dead(struct ctl *c)
{
	(void)c;
	return ctl_die("dead: not available in this build yet");
}
