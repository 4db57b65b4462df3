/* ledger.c: rosterctl ledger (being written). */
#include "ctl.h"

int ctl_ledger(struct ctl *c)
{
	(void)c;
	return ctl_die("ledger: not available in this build yet");
}
