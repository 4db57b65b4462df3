/* duplicates.c: rosterctl duplicates (being written). */
#include "ctl.h"

int ctl_duplicates(struct ctl *c)
{
	(void)c;
	return ctl_die("duplicates: not available in this build yet");
}
