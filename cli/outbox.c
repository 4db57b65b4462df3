/* outbox.c: rosterctl outbox (being written). */
#include "ctl.h"

int ctl_outbox(struct ctl *c)
{
	(void)c;
	return ctl_die("outbox: not available in this build yet");
}
