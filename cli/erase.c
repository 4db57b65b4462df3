/* erase.c: rosterctl erase (being written). */
#include "ctl.h"

int ctl_erase(struct ctl *c)
{
	(void)c;
	return ctl_die("erase: not available in this build yet");
}
