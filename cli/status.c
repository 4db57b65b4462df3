/* status.c: rosterctl status (being written). */
#include "ctl.h"

int ctl_status(struct ctl *c)
{
	(void)c;
	return ctl_die("status: not available in this build yet");
}
