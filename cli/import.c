/* import.c: rosterctl import (being written). */
#include "ctl.h"

int ctl_import(struct ctl *c)
{
	(void)c;
	return ctl_die("import: not available in this build yet");
}
