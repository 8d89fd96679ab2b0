from lumctl.cli import main

main()
