/* merge.c: rosterctl merge (being written). */
#include "ctl.h"

int ctl_merge(struct ctl *c)
{
	(void)c;
	return ctl_die("merge: not available in this build yet");
}

int ctl_unmerge(struct ctl *c)
{
	(void)c;
	return ctl_die("unmerge: not available in this build yet");
}
