from trustmgr.cli import main

main()
