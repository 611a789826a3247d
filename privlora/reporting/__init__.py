"""Reports rendered from a run folder's files alone: `report` (report.json, report.md, plots) and
`audit_section` (what `privlora audit` found). The round engine calls it at the end of a run;
`privlora report DIR` calls it again at any time."""
