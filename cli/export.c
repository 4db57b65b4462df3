/* export.c: rosterctl export (being written). */
#include "ctl.h"

int ctl_export(struct ctl *c)
{
	(void)c;
	return ctl_die("export: not available in this build yet");
}
