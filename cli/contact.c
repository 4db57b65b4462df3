/* contact.c: rosterctl contact (being written). */
#include "ctl.h"

int ctl_contact(struct ctl *c)
{
	(void)c;
	return ctl_die("contact: not available in this build yet");
}
